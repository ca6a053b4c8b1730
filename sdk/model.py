"""`RewardModel`: a transformers sequence classifier (one label) whose backbone also feeds the causal LM head.

The classifier is a stock `AutoModelForSequenceClassification`, so a saved reward model loads with plain
transformers and no code of ours. The LM head is kept next to it for the CodePMP LM term and saved inside
the same safetensors (as `lm_head.weight`, or implicitly as the embeddings when they are tied), so
pretraining can continue from a save.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipelines.errors import DataError
from sdk.data import EncodedPairs, collate_pairs, encode_pairs, fit, pad, sorted_batches
from sdk.losses import gather_last, lm_loss

if TYPE_CHECKING:
    from sdk.config import TrainConfig
    from sdk.train import TrainResult

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
            from pipelines.models import resolve_model

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

    def save_pretrained(self, output_dir: str | os.PathLike) -> Path:
        """Write safetensors + config + tokenizer, atomically (a temp dir renamed into place).

        Plain `AutoModelForSequenceClassification.from_pretrained(dir)` gives the same scores; the untied LM
        head rides along as `lm_head.weight` (plain transformers reports it as unused and ignores it).
        """
        out = Path(output_dir)
        _check_writable(out.parent)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
        classifier = self.module.classifier
        untied = self.module.lm_head is not None and not _tied(self.module)
        try:
            if untied:
                classifier.lm_head = self.module.lm_head  # saved with the classifier's (sharded) safetensors
            classifier.config.architectures = [type(classifier).__name__]
            classifier.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "codepmp.json").write_text(json.dumps({"base": self.source, "lm_head": untied}, indent=2))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if untied:
                del classifier.lm_head
        return out

    # ------------------------------------------------------------------ scoring

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _encode_responses(self, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> list[list[int]]:
        if len(prompts) != len(responses):
            raise DataError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        for name, texts in (("prompts", prompts), ("responses", responses)):
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise DataError(f"score: {name}[{i}] is a {type(t).__name__}, expected a string")
        tok = self.tokenizer
        p_ids = tok(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
        r_ids = tok(list(responses), add_special_tokens=False)["input_ids"] if responses else []
        return [fit(p, [r], tok.eos_token_id, max_length)[1][0] for p, r in zip(p_ids, r_ids, strict=True)]

    @torch.inference_mode()
    def score_ids(
        self,
        sequences: Sequence[list[int]],
        *,
        max_batch: int = 16,
        max_tokens: int = 16384,
        padding_side: str = "right",
    ) -> list[float]:
        """Rewards of already-encoded sequences, batched by length (less padding), returned in input order."""
        was_training = self.module.training
        self.module.eval()
        scores = [0.0] * len(sequences)
        pad_id = self.tokenizer.pad_token_id
        try:
            for batch in sorted_batches([len(s) for s in sequences], max_tokens, max_batch):
                ids, mask = pad([sequences[i] for i in batch], pad_id, padding_side)
                rewards, _ = self.module(torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device))
                for i, r in zip(batch, rewards.tolist(), strict=True):
                    scores[i] = r
        finally:
            self.module.train(was_training)
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
        """Reward of each (prompt, response); the same value alone or in any batch (padding is masked out)."""
        return self.score_ids(
            self._encode_responses(prompts, responses, max_length), max_batch=max_batch, padding_side=padding_side
        )

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
        return encode_pairs(table, self.tokenizer, max_length, drop_identical=drop_identical)

    def collate(self, encoded: Sequence[Any], padding_side: str = "right") -> dict[str, Any]:
        return collate_pairs(encoded, self.tokenizer.pad_token_id, padding_side)

    # ------------------------------------------------------------------ training

    def pretrain(
        self, pairs: Any, output_dir: str | os.PathLike, config: TrainConfig | None = None, **cfg: Any
    ) -> TrainResult:
        """CodePMP pretraining: `rm_coef * ranking + lm_coef * LM-on-chosen` (defaults 1.0 / 1.0, wsd)."""
        from sdk.config import TrainConfig
        from sdk.train import train

        return train(self, pairs, output_dir, config or TrainConfig(**cfg))

    def finetune(
        self, pairs: Any, output_dir: str | os.PathLike, config: TrainConfig | None = None, **cfg: Any
    ) -> TrainResult:
        """Finetuning: the spec's `finetune` defaults (ranking only, cosine) under any overrides."""
        from sdk.config import TrainConfig
        from sdk.train import train

        return train(self, pairs, output_dir, config or TrainConfig(**{**finetune_defaults(), **cfg}))


def finetune_defaults() -> dict[str, Any]:
    """Where the spec's FinetuneSpec departs from TrainConfig's defaults: read from it, so they cannot drift."""
    from pipelines.spec import FinetuneSpec
    from sdk.config import TrainConfig

    return {
        k: FinetuneSpec.model_fields[k].default
        for k, f in TrainConfig.model_fields.items()
        if FinetuneSpec.model_fields[k].default != f.default
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
