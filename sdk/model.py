"""`RewardModel`: a transformers sequence classifier (one label) whose backbone also feeds the causal LM head.

The classifier is a stock `AutoModelForSequenceClassification`, so a saved reward model loads with plain
transformers and no code of ours. The LM head is kept next to it for the CodePMP LM term and saved inside
the same safetensors (as `lm_head.weight`, or implicitly as the embeddings when they are tied), so
pretraining can continue from a save.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sdk.data import EncodedPairs, collate_pairs, encode_pairs, fit, pad, sorted_batches
from sdk.errors import DataError
from sdk.fileio import atomic_dir, atomic_files_into, atomic_write_json, precious_dirs
from sdk.losses import gather_last, lm_loss

if TYPE_CHECKING:
    from sdk.config import TrainConfig
    from sdk.train import TrainResult

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SHARED_PREFIX_MIN = 16  # prompt tokens below which `score_ids` reruns the prompt (little to save; not tuned)
SAVE_MARKER = "codepmp.json"  # in every saved reward model: what it was loaded from, and the files the save wrote
MIN_MAX_LENGTH = 3  # a prompt token, a response token and the EOS: below it every response scores the same


class RewardModule(nn.Module):
    """The trainable unit handed to DeepSpeed: classifier + LM head sharing one backbone forward."""

    def __init__(self, classifier: nn.Module, lm_head: nn.Linear | None) -> None:
        super().__init__()
        self.classifier = classifier
        self.lm_head = lm_head

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.classifier, self.classifier.base_model_prefix)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lm_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rewards (B,) at the last real token; LM loss on the first `len(lm_labels)` rows when labels are given.

        Position ids count real tokens only, so a left-padded row sees the same positions as an unpadded one
        (transformers would otherwise number the padding too, and scores would depend on the batch).
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        rewards = self.classifier.score(gather_last(hidden, attention_mask)).squeeze(-1).float()
        if lm_labels is None:
            return rewards, None
        if self.lm_head is None:
            raise DataError("this model has no LM head: train with lm_coef=0")
        return rewards, lm_loss(hidden[: lm_labels.shape[0]], lm_labels, self.lm_head)


class RewardModel:
    """Score, evaluate, train and save a reward model (DESIGN.md §5).

    Sequences are `prompt + response + EOS` (see `sdk.data`); the reward is the classifier's value at the EOS.
    """

    def __init__(self, module: RewardModule, tokenizer: Any, source: str) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.source = source

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
    ) -> RewardModel:
        """Load a causal LM dir, a registry name (e.g. `smollm2-135m-instruct`) or a saved reward model.

        From a causal LM the score head starts small and random (seeded, so runs repeat) and the LM head is
        taken from the checkpoint; from a saved reward model both come back as saved.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = str(name_or_path)
        if not Path(path).is_dir():
            from sdk.models import resolve_model

            path = resolve_model(path)
        local = Path(path).is_dir()
        if local and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
            raise DataError(f"model dir {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot load a tokenizer from {path}: {exc}") from exc
        if tokenizer.eos_token_id is None:
            raise DataError(f"tokenizer of {path} has no EOS token: the reward is read at the appended EOS")
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(config, "num_labels", 1) != 1 and any("Classification" in a for a in config.architectures or []):
            raise DataError(f"{path} is a classifier with {config.num_labels} labels; a reward model has 1")
        pad_id = _pad_token_id(tokenizer)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
        config.num_labels = 1
        config.pad_token_id = pad_id
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected from a causal LM
        try:
            classifier, info = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        if not hasattr(classifier, "score"):
            raise DataError(f"{type(classifier).__name__} has no `score` head: unsupported architecture")
        if any(k.startswith("score") for k in info["missing_keys"]):
            hidden = classifier.score.in_features
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                classifier.score.weight.copy_(
                    torch.randn(classifier.score.weight.shape, generator=gen) / (hidden + 1) ** 0.5
                )
        module = RewardModule(classifier, _lm_head(classifier, path, config))
        module.eval()
        return cls(module, tokenizer, path)

    def save_pretrained(self, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write safetensors + config + tokenizer, atomically, without ever deleting a file codepmp did not write.

        Plain `AutoModelForSequenceClassification.from_pretrained(dir)` gives the same scores; the untied LM
        head rides along as `lm_head.weight` (plain transformers reports it as unused and ignores it).

        A missing or empty `output_dir`, or a previous save holding only its own files, is replaced whole (no
        stale shard of an earlier save survives). A directory holding anything else is refused, unless
        `overwrite=True`: then only the files of this save (and of the previous one, per its `codepmp.json`)
        are replaced or removed, each atomically, and the rest is left as it was.
        """
        out = Path(output_dir)
        previous = check_save_dir(out, overwrite)
        _check_writable(out.parent)
        classifier = self.module.classifier
        untied = self.module.lm_head is not None and not _tied(self.module)
        marker = {"base": self.source, "lm_head": untied}
        try:
            if untied:
                classifier.lm_head = self.module.lm_head  # saved with the classifier's (sharded) safetensors
            classifier.config.architectures = [type(classifier).__name__]
            if previous is None:
                with atomic_dir(out) as tmp:
                    files = self._write(tmp)
                    atomic_write_json(tmp / SAVE_MARKER, {**marker, "files": files})
                return out
            with atomic_files_into(out) as tmp:
                files = self._write(tmp)
                # recorded before any file moves in: a crash midway leaves every file of ours known as ours
                every = sorted((previous | set(files)) - {SAVE_MARKER})
                atomic_write_json(out / SAVE_MARKER, {**marker, "files": every})
            root = out.resolve()
            # the earlier save's files this one did not rewrite (its shards): a loader could pick them up
            for stale in sorted(previous - {*files, SAVE_MARKER}):
                path = out / stale
                if (path.is_file() or path.is_symlink()) and path.parent.resolve().is_relative_to(root):
                    path.unlink()
            atomic_write_json(out / SAVE_MARKER, {**marker, "files": files})
            return out
        finally:
            if untied:
                del classifier.lm_head

    def _write(self, directory: Path) -> list[str]:
        """The HF files of this model into `directory`; returns their paths relative to it."""
        self.module.classifier.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())

    # ------------------------------------------------------------------ scoring

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _encode_responses(
        self, prompts: Sequence[str], responses: Sequence[str], max_length: int
    ) -> tuple[list[list[int]], list[int]]:
        """Sequences `prompt + response + EOS` after truncation, and the prompt tokens each one kept."""
        check_max_length(max_length)
        for name, texts in (("prompts", prompts), ("responses", responses)):
            if isinstance(texts, str | bytes):  # would be scored character by character
                raise DataError(
                    f"score: {name} is a {type(texts).__name__}, expected a list of strings (one per pair): "
                    "score([prompt], [response])"
                )
        if len(prompts) != len(responses):
            raise DataError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        for name, texts in (("prompts", prompts), ("responses", responses)):
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise DataError(f"score: {name}[{i}] is a {type(t).__name__}, expected a string")
        tok = self.tokenizer
        p_ids = tok(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
        r_ids = tok(list(responses), add_special_tokens=False)["input_ids"] if responses else []
        fitted = [fit(p, [r], tok.eos_token_id, max_length) for p, r in zip(p_ids, r_ids, strict=True)]
        return [seqs[0] for _, seqs in fitted], [kept for kept, _ in fitted]

    @torch.inference_mode()
    def score_ids(
        self,
        sequences: Sequence[list[int]],
        *,
        max_batch: int = 16,
        max_tokens: int | None = None,
        padding_side: str = "right",
        prefix_lens: Sequence[int] | None = None,
    ) -> list[float]:
        """Rewards of already-encoded sequences, batched by length (less padding), returned in input order.

        `max_tokens` bounds the padded tokens of a batch; by default 16384 on CUDA and 1024 elsewhere: on 2 CPU
        cores (SmolLM2-135M, fp32) 400 / 1024 / 2048 / 16384 tokens per batch ran at 503 / 538 / 475 / 366
        tok/s, as big batches thrash the cache.

        `prefix_lens[i]` is the number of leading prompt tokens of `sequences[i]`. Sequences with the same
        prompt (at least `SHARED_PREFIX_MIN` tokens, shared by two or more) compute it once: its KV cache
        is repeated over chunks of their responses, which are all that is run again (see `_score_shared`).
        Best-of-N on 8 HumanEval prompts x 8 candidates (prompts 111-155 of 205-372 tokens): 7.1 cand/s vs 4.2
        scoring each alone (1.7x, 2 CPU cores), scores equal to 9e-6 (`benchmarks/bench_bon.py`). All other
        sequences take the plain batched path.

        Identical sequences are scored once, so they get exactly equal rewards (a tie stays a tie: batches of
        other shapes may differ in the last bits).
        """
        if max_tokens is None:
            max_tokens = 16384 if self.device.type == "cuda" else 1024
        if prefix_lens is not None and len(prefix_lens) != len(sequences):
            raise DataError(f"score_ids: {len(sequences)} sequences but {len(prefix_lens)} prefix lengths")
        keys = [tuple(seq) for seq in sequences]
        first: dict[tuple[int, ...], int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        kept = list(first.values())
        distinct = self._score_distinct(
            [sequences[i] for i in kept],
            None if prefix_lens is None else [prefix_lens[i] for i in kept],
            max_tokens,
            max_batch,
            padding_side,
        )
        by_key = dict(zip(first, distinct, strict=True))
        return [by_key[key] for key in keys]

    def _score_distinct(
        self,
        sequences: list[list[int]],
        prefix_lens: list[int] | None,
        max_tokens: int,
        max_batch: int,
        padding_side: str,
    ) -> list[float]:
        """`score_ids` on sequences that are all different: shared prompts once, the rest in plain batches."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, k in enumerate(prefix_lens or ()):
            if SHARED_PREFIX_MIN <= k < len(sequences[i]):
                groups.setdefault(tuple(sequences[i][:k]), []).append(i)
        shared = {prefix: members for prefix, members in groups.items() if len(members) >= 2}
        in_shared = {i for members in shared.values() for i in members}
        plain = [i for i in range(len(sequences)) if i not in in_shared]
        was_training = self.module.training
        self.module.eval()
        scores = [0.0] * len(sequences)
        pad_id = self.tokenizer.pad_token_id
        try:
            for batch in sorted_batches([len(sequences[i]) for i in plain], max_tokens, max_batch):
                rows = [plain[j] for j in batch]
                ids, mask = pad([sequences[i] for i in rows], pad_id, padding_side)
                rewards, _ = self.module(torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device))
                for i, r in zip(rows, rewards.tolist(), strict=True):
                    scores[i] = r
            for prefix, members in shared.items():
                suffixes = [sequences[i][len(prefix) :] for i in members]
                shared_scores = self._score_shared(list(prefix), suffixes, max_tokens, max_batch)
                for i, r in zip(members, shared_scores, strict=True):
                    scores[i] = r
        finally:
            self.module.train(was_training)
        return scores

    def _score_shared(
        self, prefix: list[int], suffixes: list[list[int]], max_tokens: int, max_batch: int
    ) -> list[float]:
        """Rewards of `prefix + suffix` for each suffix, the prefix run once with a KV cache.

        Chunks are bounded by full (prefix + padded suffix) tokens, as the plain path's batches are. Suffixes
        are right-padded and their positions continue from the prefix, counting real tokens only, as
        `RewardModule.forward` numbers them, so the scores are the plain path's.
        """
        backbone, device, n_prefix = self.module.backbone, self.device, len(prefix)
        cache = backbone(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
        scores = [0.0] * len(suffixes)
        for batch in sorted_batches([n_prefix + len(s) for s in suffixes], max_tokens, max_batch):
            ids, mask = pad([suffixes[j] for j in batch], self.tokenizer.pad_token_id, "right")
            suffix_mask = torch.tensor(mask, device=device)
            chunk_cache = copy.deepcopy(cache)
            chunk_cache.batch_repeat_interleave(len(batch))
            hidden = backbone(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.cat([suffix_mask.new_ones(len(batch), n_prefix), suffix_mask], dim=1),
                position_ids=n_prefix + (suffix_mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=chunk_cache,
                use_cache=True,
            ).last_hidden_state
            rewards = self.module.classifier.score(gather_last(hidden, suffix_mask)).squeeze(-1).float()
            for j, r in zip(batch, rewards.tolist(), strict=True):
                scores[j] = r
        return scores

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        max_batch: int = 16,
        max_length: int = 2048,
        padding_side: str = "right",
    ) -> list[float]:
        """Reward of each (prompt, response); the same value alone or in any batch (padding is masked out).

        Responses to the same prompt share its forward (`score_ids` with `prefix_lens`).
        """
        sequences, prompt_lens = self._encode_responses(prompts, responses, max_length)
        return self.score_ids(sequences, max_batch=max_batch, padding_side=padding_side, prefix_lens=prompt_lens)

    def evaluate(
        self, pairs: Any, *, max_length: int = 2048, max_batch: int = 16, group_by: str | None = "language"
    ) -> dict[str, Any]:
        """Pairwise accuracy (ties count half), mean margin r_c - r_r, n, and accuracy per `group_by` value."""
        from sdk.evaluation import heldout_accuracy

        groups = (group_by,) if group_by else ()
        return heldout_accuracy(self, pairs, group_by=groups, max_length=max_length, max_batch=max_batch)

    def best_of_n(self, prompts: Any, candidates: Any = None, **kwargs: Any) -> Any:
        """`sdk.bon.best_of_n` with this model as the reward model."""
        from sdk.bon import best_of_n

        return best_of_n(prompts, candidates, reward_model=self, **kwargs)

    def encode(self, table: Any, max_length: int, drop_identical: bool = True) -> EncodedPairs:
        """Tokenize pairs with the module's truncation rule (`sdk.data`)."""
        check_max_length(max_length)
        return encode_pairs(table, self.tokenizer, max_length, drop_identical=drop_identical)

    def collate(self, encoded: Sequence[Any], padding_side: str = "right") -> dict[str, Any]:
        return collate_pairs(encoded, self.tokenizer.pad_token_id, padding_side)

    # ------------------------------------------------------------------ training

    def pretrain(
        self,
        pairs: Any,
        output_dir: str | os.PathLike,
        config: TrainConfig | None = None,
        *,
        overwrite: bool = False,
        **cfg: Any,
    ) -> TrainResult:
        """CodePMP pretraining: `rm_coef * ranking + lm_coef * LM-on-chosen` (defaults 1.0 / 1.0, wsd).

        `output_dir` is new, empty or an earlier run's; `overwrite=True` writes beside other files (`sdk.train`).
        """
        from sdk.config import TrainConfig
        from sdk.train import train

        return train(self, pairs, output_dir, config or TrainConfig(**cfg), overwrite=overwrite)

    def finetune(
        self,
        pairs: Any,
        output_dir: str | os.PathLike,
        config: TrainConfig | None = None,
        *,
        overwrite: bool = False,
        **cfg: Any,
    ) -> TrainResult:
        """Finetuning: the spec's `finetune` defaults (ranking only, cosine) under any overrides."""
        from sdk.config import TrainConfig
        from sdk.train import train

        config = config or TrainConfig(**{**finetune_defaults(), **cfg})
        return train(self, pairs, output_dir, config, overwrite=overwrite)


def finetune_defaults() -> dict[str, Any]:
    """Where FinetuneConfig (the spec's `finetune` defaults) departs from TrainConfig's: read from it, so they
    cannot drift."""
    from sdk.config import FinetuneConfig, TrainConfig

    return {
        k: FinetuneConfig.model_fields[k].default
        for k, f in TrainConfig.model_fields.items()
        if FinetuneConfig.model_fields[k].default != f.default
    }


def _pad_token_id(tokenizer: Any) -> int:
    """A pad id distinct from EOS: plain transformers reads the reward at the last token != pad, and that
    token is our appended EOS. Falls back to UNK/BOS/id 0 (never fed as input where it matters)."""
    eos = tokenizer.eos_token_id
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, 0, 1):
        if candidate is not None and candidate != eos:
            return candidate
    raise DataError("no usable padding token distinct from EOS")


def _tied(module: RewardModule) -> bool:
    return module.lm_head is not None and module.lm_head.weight is module.backbone.get_input_embeddings().weight


def _lm_head(classifier: nn.Module, path: str, config: Any) -> nn.Linear | None:
    """The causal LM head: the input embeddings when tied, else `lm_head.weight` read from the checkpoint."""
    backbone = getattr(classifier, classifier.base_model_prefix)
    embed = backbone.get_input_embeddings().weight
    head = nn.Linear(embed.shape[1], embed.shape[0], bias=False, device="meta")  # weight assigned below
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        head.weight = embed
        return head
    weight = _read_tensor(path, "lm_head.weight")
    if weight is None:
        return None
    head.weight = nn.Parameter(weight.to(embed.dtype))
    return head


def _read_tensor(path: str, key: str) -> torch.Tensor | None:
    from safetensors import safe_open

    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text())["weight_map"].get(key)
        files = [root / shard] if shard else []
    else:
        files = [root / "model.safetensors"] if (root / "model.safetensors").is_file() else []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                return f.get_tensor(key)
    return None


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise DataError(f"output dir {directory} is not writable ({exc.strerror})") from exc


def check_max_length(max_length: int) -> None:
    """Refuse a length that cannot hold a response token: truncation would leave every response the same
    (often just the EOS), and every score equal, with no sign of it."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < MIN_MAX_LENGTH:
        raise DataError(
            f"max_length={max_length!r}: a sequence must hold a prompt token, a response token and the EOS, "
            f"so use at least {MIN_MAX_LENGTH} (default 2048)"
        )


# ---------------------------------------------------------------------- output directories (DESIGN.md §6c)


def check_not_precious(directory: Path, what: str) -> None:
    """Refuse the file system root, the home directory and a git checkout's root as an output dir: whatever
    the flags, codepmp has no business replacing files there."""
    resolved = directory.resolve()
    if resolved not in precious_dirs():
        return
    if resolved == Path("/"):
        why = "the file system root"
    elif resolved == Path.home().resolve():
        why = "your home directory"
    else:
        why = "the root of a git checkout"
    raise DataError(f"{what}: refusing {directory}: it is {why}; give a directory of its own inside it")


def check_save_dir(directory: Path, overwrite: bool) -> set[str] | None:
    """Whether `save_pretrained` may write `directory`, decided before anything is written.

    None: it is missing, empty or a previous save holding only its own files, so it may be replaced whole.
    A set (only with `overwrite`): it holds other files too; the set is the files a previous save recorded,
    which may be replaced or removed, the only ones.
    """
    check_not_precious(directory, "save_pretrained")
    if directory.exists() and not directory.is_dir():
        raise DataError(f"save_pretrained: {directory} is a file, not a directory")
    ours = _saved_files(directory)
    foreign = _foreign_entries(directory, ours or set()) if directory.is_dir() else []
    if not foreign:
        return None
    if not overwrite:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(
            f"save_pretrained: {directory} holds files codepmp did not write ({shown}); save to another "
            "directory, or pass overwrite=True to replace only codepmp's files there and keep the others"
        )
    return ours or set()


def _saved_files(directory: Path) -> set[str] | None:
    """The files a previous save recorded in its marker, the marker included; None without a usable record.

    Only plain relative paths count: a marker naming `../x` or `/x` is not ours, and nothing it names is removed.
    """
    try:
        files = json.loads((directory / SAVE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list):
        return None
    for name in files:
        if not isinstance(name, str) or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            return None
    return {*files, SAVE_MARKER}


def _foreign_entries(directory: Path, ours: set[str]) -> list[str]:
    """Files (and symlinks, and empty directories) under `directory` that are not in `ours`, sorted."""
    foreign = []
    for dirpath, dirnames, filenames in os.walk(directory):
        rel = Path(dirpath).relative_to(directory)
        links = [d for d in dirnames if Path(dirpath, d).is_symlink()]  # os.walk does not enter them
        foreign += [(rel / name).as_posix() for name in filenames + links if (rel / name).as_posix() not in ours]
        if rel != Path(".") and not filenames and not dirnames:
            foreign.append(f"{rel.as_posix()}/")
    return sorted(foreign)
