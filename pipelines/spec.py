"""The run spec: one Pydantic tree, the single source of truth for every stage.

Each stage reads its own section and nothing else. Sections are optional (a spec may omit stages);
only `name` is required. Paths are resolved against the spec file's directory at validation time,
and `load_spec` turns every user mistake into a `SpecError` that names the file and the field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from sdk.config import (
    MAX_TOKENS,
    FinetuneConfig,
    GeneratorSpec,
    ModelName,
    ModelSpec,
    SamplingSpec,
    StrictModel,
    TrainConfig,
    resolve_path,
)
from sdk.errors import SpecError

# Sentinel source path meaning "the running Python's standard library" (real code on every machine).
STDLIB = "stdlib"
# Special finetune/evaluate data name: execution-labelled HumanEval pairs built offline.
HUMANEVAL_EXEC = "humaneval-exec"
SPECIAL_PATHS = frozenset({STDLIB, HUMANEVAL_EXEC})
HUMANEVAL_SIZE = 164  # problems in the benchmark


# --------------------------------------------------------------------------- paths


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Resolve a relative path against the spec file's directory; the special paths stay as they are."""
    return value if value in SPECIAL_PATHS else resolve_path(value, info)


SpecPath = Annotated[str, Field(min_length=1), AfterValidator(_resolve_path)]


# --------------------------------------------------------------------------- executor


# Upper bounds on counts and lengths: a typo (10^20 tasks, a 10^9-token reply) is an error, not a hang.
MAX_TASKS = 100_000  # datatrove tasks of one stage; ~280 files per task at the paper's 28M
MAX_CHUNK = 1 << 20  # records a generation task holds at once: its memory bound
STAGE_EXECUTOR_DOC = (
    "Where this stage's tasks run (e.g. GPU nodes: kind slurm with gpus_per_task); null = the top-level executor."
)


class _ExecutorBase(StrictModel):
    tasks: int = Field(1, gt=0, le=MAX_TASKS, description="Shards the work is split into (datatrove tasks).")
    workers: int = Field(-1, ge=-1, description="Tasks run at once; -1 = as many as tasks.")
    logging_dir: SpecPath | None = Field(None, description="Defaults to WORKDIR/<stage>/logs.")

    @model_validator(mode="after")
    def _workers_fit_tasks(self):
        if self.workers > self.tasks:
            raise ValueError(f"workers ({self.workers}) must be <= tasks ({self.tasks}) or -1")
        if self.workers == 0:
            raise ValueError("workers must be -1 (all) or >= 1")
        return self


class LocalExecutor(_ExecutorBase):
    """Run datatrove tasks as processes on this machine."""

    kind: Literal["local"] = "local"


class SlurmExecutor(_ExecutorBase):
    """Submit datatrove tasks as a Slurm job array."""

    kind: Literal["slurm"]
    partition: str = Field(min_length=1)
    time: str = Field("24:00:00", pattern=r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$", description="Slurm time limit.")
    cpus_per_task: int = Field(1, gt=0, le=1024)
    mem_per_cpu_gb: float = Field(2.0, gt=0)
    gpus_per_task: int = Field(0, ge=0, le=64)
    qos: str | None = None
    max_array_launch_parallel: bool = False
    sbatch_args: dict[str, str] = Field(default_factory=dict, description="Extra #SBATCH options.")
    env_command: str | None = Field(None, description="Shell line run before each task (e.g. venv activate).")


class RayExecutor(_ExecutorBase):
    """Run datatrove tasks on a Ray cluster."""

    kind: Literal["ray"]
    address: str | None = Field(None, description="Ray cluster address; null starts/joins a local one.")
    cpus_per_task: int = Field(1, gt=0, le=1024)
    mem_per_cpu_gb: float = Field(2.0, gt=0)
    gpus_per_task: float = Field(0, ge=0)


def _kind(default: str):
    """Discriminate a union on `kind`, defaulting to `default` when the user leaves it out."""

    def pick(value: Any) -> str:
        return value.get("kind", default) if isinstance(value, dict) else getattr(value, "kind", default)

    return Discriminator(pick)


Executor = Annotated[
    Annotated[LocalExecutor, Tag("local")]
    | Annotated[SlurmExecutor, Tag("slurm")]
    | Annotated[RayExecutor, Tag("ray")],
    _kind("local"),
]


# --------------------------------------------------------------------------- source


class SizeHint(StrictModel):
    """What `plan` assumes about a source it cannot count offline (hub datasets)."""

    documents: int = Field(gt=0)
    mean_bytes: int = Field(3000, gt=0, description="Mean file size in bytes.")


class _SourceBase(StrictModel):
    languages: list[str] | None = Field(None, description="Language allowlist (by extension); null keeps all.")
    limit: int | None = Field(None, gt=0, description="Read at most this many documents (per run).")
    size_hint: SizeHint | None = None


class LocalSource(_SourceBase):
    """Local source trees and git repositories (for git, the tracked files of HEAD)."""

    kind: Literal["local"] = "local"
    paths: list[SpecPath] = Field(min_length=1, description="Directories; `stdlib` = this Python's stdlib.")
    git: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: read tracked files of HEAD when a path is a git work tree."
    )
    follow_symlinks: bool = False


class ColumnMap(StrictModel):
    """Column names of code datasets (defaults fit codeparrot/github-code; The Stack uses `content`)."""

    text: str = "code"
    path: str | None = "path"
    repo: str | None = "repo_name"
    language: str | None = "language"
    license: str | None = "license"
    size: str | None = "size"


class HuggingFaceSource(_SourceBase):
    """A Hugging Face code dataset, streamed through datatrove's HF reader (needs hub access)."""

    kind: Literal["huggingface"]
    dataset: str = Field(min_length=1, description="Hub id, e.g. codeparrot/github-code-clean.")
    subset: str | None = Field(None, description="Dataset config/subset, e.g. a language dir of The Stack.")
    split: str = "train"
    streaming: bool = True
    revision: str | None = None
    columns: ColumnMap = Field(default_factory=ColumnMap)


class FileShardSource(_SourceBase):
    """jsonl(.gz) or parquet shards with the same columns as the HF layouts."""

    kind: Literal["jsonl", "parquet"]
    paths: list[SpecPath] = Field(min_length=1, description="Files, directories or globs.")
    columns: ColumnMap = Field(default_factory=ColumnMap)


Source = Annotated[
    Annotated[LocalSource, Tag("local")]
    | Annotated[HuggingFaceSource, Tag("huggingface")]
    | Annotated[FileShardSource, Tag("jsonl")]
    | Annotated[FileShardSource, Tag("parquet")],
    _kind("local"),
]


# --------------------------------------------------------------------------- filters


class _Switch(StrictModel):
    enabled: bool = True


class SizeFilter(_Switch):
    min_bytes: int = Field(1, ge=0)
    max_bytes: int = Field(1_000_000, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_bytes > self.max_bytes:
            raise ValueError(f"min_bytes ({self.min_bytes}) must be <= max_bytes ({self.max_bytes})")
        return self


class MaxLineFilter(_Switch):
    max_chars: int = Field(1000, gt=0, description="StarCoder: drop files with any line longer than this.")


class MeanLineFilter(_Switch):
    max_chars: float = Field(100, gt=0, description="StarCoder: drop files whose mean line length exceeds this.")


class AlphanumFilter(_Switch):
    min_fraction: float = Field(0.25, ge=0, le=1, description="StarCoder: minimum alphanumeric share.")


class AutogenFilter(_Switch):
    head_lines: int = Field(5, gt=0, description="Look for 'auto-generated' markers in this many first lines.")


class EncodedDataFilter(_Switch):
    min_match_chars: int = Field(64, gt=0, description="A base64/hex run must be this long to count.")
    max_match_chars: int = Field(1024, gt=0, description="Drop a file with any single run this long.")
    max_fraction: float = Field(0.5, ge=0, le=1, description="Drop a file whose runs cover this share.")


class LicenseFilter(_Switch):
    enabled: bool = False
    allow: list[str] = Field(
        default_factory=lambda: ["mit", "apache-2.0", "bsd-3-clause", "bsd-2-clause", "isc", "unlicense", "cc0-1.0"]
    )


class MinLinesFilter(_Switch):
    enabled: bool = False
    min_lines: int = Field(5, gt=0)


class FiltersSpec(StrictModel):
    """Code filters; defaults follow The Stack / StarCoder practice."""

    size: SizeFilter = Field(default_factory=SizeFilter)
    max_line: MaxLineFilter = Field(default_factory=MaxLineFilter)
    mean_line: MeanLineFilter = Field(default_factory=MeanLineFilter)
    alphanumeric: AlphanumFilter = Field(default_factory=AlphanumFilter)
    autogenerated: AutogenFilter = Field(default_factory=AutogenFilter)
    encoded_data: EncodedDataFilter = Field(default_factory=EncodedDataFilter)
    binary: _Switch = Field(default_factory=_Switch)
    license: LicenseFilter = Field(default_factory=LicenseFilter)
    min_lines: MinLinesFilter = Field(default_factory=MinLinesFilter)
    keep_dropped: bool = Field(False, description="Write dropped files to WORKDIR/curate/excluded/<reason>/.")


# --------------------------------------------------------------------------- dedup


class ExactDedup(_Switch):
    """Exact dedup on a hash of whitespace-normalised content."""


class MinhashDedup(_Switch):
    """Near-dedup with datatrove's MinHash stages (defaults are datatrove's)."""

    ngram: int = Field(5, gt=0, description="Word n-gram size of the shingles.")
    buckets: int = Field(14, gt=0)
    hashes_per_bucket: int = Field(8, gt=0)
    seed: int = 1

    @model_validator(mode="after")
    def _signature_size(self):
        total = self.buckets * self.hashes_per_bucket
        if total > 4096:
            raise ValueError(f"buckets x hashes_per_bucket = {total} hashes per document; keep it <= 4096")
        threshold = self.similarity_threshold
        if not 0.3 <= threshold <= 0.99:
            raise ValueError(
                f"buckets={self.buckets}, hashes_per_bucket={self.hashes_per_bucket} put the similarity "
                f"threshold (1/b)^(1/r) at {threshold:.2f}; choose values giving 0.3..0.99"
            )
        return self

    @property
    def similarity_threshold(self) -> float:
        """Jaccard similarity at which a pair has a 50% chance to share a bucket."""
        return (1 / self.buckets) ** (1 / self.hashes_per_bucket)


class DedupSpec(StrictModel):
    exact: ExactDedup = Field(default_factory=ExactDedup)
    minhash: MinhashDedup = Field(default_factory=MinhashDedup)


# --------------------------------------------------------------------------- generation


DESCRIBE_TEMPLATE = (
    "Here is a {language} source file.\n\n```{language}\n{code}\n```\n\n"
    "Analyse its intent and its function: what problem it solves, its inputs and outputs, and how it works. "
    "Then write the instruction a developer would have been given to write this code, as one self-contained "
    "task description. Reply with the instruction only."
)

GENERATE_TEMPLATE = (
    "{instruction}\n\nImplement this in {language}. Write correct, logical and readable code in one "
    "```{language_tag}``` block."
)


class DescribeSpec(StrictModel):
    """The describer LLM writes, for each curated file, the instruction the file answers."""

    model: ModelSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    template: str = Field(DESCRIBE_TEMPLATE, description="Placeholders: {code}, {language}, {path}.")
    use_chat_template: bool = True
    max_input_tokens: int = Field(
        2048, gt=0, le=MAX_TOKENS, description="Prompt budget; longer files keep their head, cut at a line break."
    )
    min_instruction_chars: int = Field(20, ge=0, description="Shorter instructions are dropped as degenerate.")
    chunk_size: int = Field(
        256, gt=0, le=MAX_CHUNK, description="Documents a task has in flight; each chunk's output is written when done."
    )
    executor: Executor | None = Field(None, description=STAGE_EXECUTOR_DOC)

    @model_validator(mode="after")
    def _template_fields(self):
        _check_placeholders(self.template, required={"code"}, allowed={"code", "language", "path"})
        context = self.model.max_model_len
        if context is not None and self.max_input_tokens + self.sampling.max_new_tokens > context:
            raise ValueError(
                f"max_input_tokens ({self.max_input_tokens}) + sampling.max_new_tokens "
                f"({self.sampling.max_new_tokens}) exceed model.max_model_len ({context})"
            )
        return self


class GenerateSpec(StrictModel):
    """A strong model (chosen) and a weak model (rejected) each implement every instruction."""

    strong: GeneratorSpec
    weak: GeneratorSpec
    template: str = Field(GENERATE_TEMPLATE, description="Placeholders: {instruction}, {language}, {language_tag}.")
    use_chat_template: bool = True
    allow_same_model: bool = Field(False, description="Allow strong == weak (then sampling must differ).")
    chunk_size: int = Field(
        256,
        gt=0,
        le=MAX_CHUNK,
        description="Instructions a task has in flight; each chunk's output is written when done.",
    )
    executor: Executor | None = Field(None, description=STAGE_EXECUTOR_DOC)

    @model_validator(mode="after")
    def _distinct_models(self):
        _check_placeholders(
            self.template, required={"instruction"}, allowed={"instruction", "language", "language_tag"}
        )
        if self.strong.model.identity() == self.weak.model.identity():
            if not self.allow_same_model:
                raise ValueError(
                    f"strong and weak are the same model ({self.strong.model.name}); a pair needs a weaker "
                    "'rejected' model: set weak.model (e.g. with prune) or allow_same_model: true"
                )
            if self.strong.sampling == self.weak.sampling:
                raise ValueError("allow_same_model needs different strong/weak sampling settings")
        return self


def _check_placeholders(template: str, required: set[str], allowed: set[str]) -> None:
    used = set(re.findall(r"(?<!\{)\{(\w+)\}(?!\})", template))
    if unknown := used - allowed:
        raise ValueError(f"template uses unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if missing := required - used:
        raise ValueError(f"template must contain {sorted('{' + m + '}' for m in missing)}")


# --------------------------------------------------------------------------- pairs


class PairChecks(StrictModel):
    drop_empty: bool = Field(True, description="Either side empty or only an empty code fence.")
    near_identical_similarity: float = Field(
        0.95, gt=0, le=1, description="Drop pairs whose sides are at least this similar (1.0 = identical only)."
    )
    drop_truncated: bool = Field(True, description="Drop sides cut off by max_new_tokens.")
    keep_truncated_rejected: bool = Field(
        False,
        description="With drop_truncated, still keep pairs whose *rejected* side hit the limit: a weak model "
        "rambling to the limit is a real failure mode, unlike a truncated chosen side.",
    )
    drop_repetition: bool = True
    repetition_max_line_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A side whose most repeated line (or back-to-back repeated block) covers this share of its "
        "lines is a loop.",
    )
    repetition_min_lines: int = Field(4, ge=2, description="Sides with fewer content lines are too short to call.")


class PairBalance(StrictModel):
    seed: int = 0
    language_quotas: dict[str, float] | None = Field(None, description="Max share of pairs per language.")
    length_bias_target: float | None = Field(
        0.5, ge=0, le=1, description="Rebalance share(chosen longer) toward this; null keeps all pairs."
    )
    length_bias_tolerance: float = Field(0.1, ge=0, le=0.5)

    @model_validator(mode="after")
    def _quotas(self):
        for lang, share in (self.language_quotas or {}).items():
            if not 0 < share <= 1:
                raise ValueError(f"language_quotas.{lang}: share must be in (0, 1], got {share}")
        return self


class PairShards(StrictModel):
    rows_per_shard: int = Field(100_000, gt=0)
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    heldout_fraction: float = Field(0.02, ge=0, lt=1, description="Pairs written to heldout-*.parquet for eval.")


class PairsSpec(StrictModel):
    """Pair checks and the balancing writer (TRL preference format)."""

    checks: PairChecks = Field(default_factory=PairChecks)
    balance: PairBalance = Field(default_factory=PairBalance)
    shards: PairShards = Field(default_factory=PairShards)
    executor: Executor | None = Field(
        None, description="Where the checks run (a task per share of the generate shards); " + STAGE_EXECUTOR_DOC
    )


# --------------------------------------------------------------------------- training and evaluation


class PretrainSpec(TrainConfig):
    """CodePMP pretraining of the reward model on the code pairs."""

    model: ModelName = Field(description="Base causal LM: registry name, local dir or hub id.")
    data: SpecPath | None = Field(None, description="Pairs path/glob; default: WORKDIR/pairs/train-*.parquet.")
    trust_remote_code: bool = False


class SandboxSpec(StrictModel):
    timeout_s: float = Field(10, gt=0)
    memory_mb: int = Field(1024, gt=0)


class HumanEvalExecSpec(StrictModel):
    """Execution-labelled finetuning pairs: sampled HumanEval solutions that pass vs fail their tests.

    Built from the *last* `problems` problems; Best-of-N evaluates the first ones, so the two never overlap.
    """

    generator: GeneratorSpec
    k: int = Field(8, gt=0, le=1024, description="Candidates sampled per problem.")
    problems: int = Field(
        40, gt=0, le=HUMANEVAL_SIZE, description="Take the last N HumanEval problems (evaluation takes the first)."
    )
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    max_pairs_per_problem: int = Field(4, gt=0, description="Cap, so easy problems do not dominate.")


class FinetuneSpec(FinetuneConfig):
    """Finetuning on reasoning preference pairs (ranking loss only by default)."""

    model: ModelName | None = Field(None, description="Default: the pretrain stage's final model.")
    data: SpecPath = Field(description=f"Pairs path/glob, or `{HUMANEVAL_EXEC}` (execution-labelled HumanEval).")
    humaneval_exec: HumanEvalExecSpec | None = Field(None, description=f"How to build `{HUMANEVAL_EXEC}` data.")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _exec_settings(self):
        if self.data == HUMANEVAL_EXEC and self.humaneval_exec is None:
            raise ValueError(
                f"data: {HUMANEVAL_EXEC} needs a `humaneval_exec` section (generator, k, problems) to build it"
            )
        if self.data != HUMANEVAL_EXEC and self.humaneval_exec is not None:
            raise ValueError(f"humaneval_exec is only used with data: {HUMANEVAL_EXEC} (data is {self.data})")
        return self


class BestOfNSpec(StrictModel):
    benchmark: Literal["humaneval"] = "humaneval"
    generator: GeneratorSpec
    k: int = Field(16, gt=0, le=1024, description="Candidates sampled per problem; N runs over 1, 2, 4, ..., k.")
    problems: int | None = Field(None, gt=0, description="Use the first N problems; null = all 164.")
    draws: int = Field(20, gt=0, le=10_000, description="Subsamples of N out of k, for mean +- spread.")
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)


class EvaluateSpec(StrictModel):
    """Reward-model accuracy on held-out pairs and Best-of-N."""

    model: ModelName | None = Field(None, description="Default: the last trained model (finetune, else pretrain).")
    heldout: SpecPath | None = Field(None, description="Pairs path/glob; default: WORKDIR/pairs/heldout-*.parquet.")
    best_of_n: BestOfNSpec | None = None
    math_data: SpecPath | None = Field(None, description="jsonl of question/answer/candidates, checked by math-verify.")
    executor: Executor | None = Field(
        None, description="Where Best-of-N sampling runs (a task per share of the problems); " + STAGE_EXECUTOR_DOC
    )


# --------------------------------------------------------------------------- root


class Spec(StrictModel):
    """A codepmp run: which stages to run and how."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    workdir: SpecPath | None = Field(None, description="Run directory; default ./runs/<name> (from the CWD).")
    executor: Executor = Field(default_factory=LocalExecutor)
    source: Source | None = None
    filters: FiltersSpec = Field(default_factory=FiltersSpec)
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    describe: DescribeSpec | None = None
    generate: GenerateSpec | None = None
    pairs: PairsSpec | None = None
    pretrain: PretrainSpec | None = None
    finetune: FinetuneSpec | None = None
    evaluate: EvaluateSpec | None = None

    @model_validator(mode="after")
    def _engines_fit_tasks(self):
        """One vLLM engine per task: a model's tensor-parallel GPUs must be GPUs the task was given."""
        for stage, models in (
            ("describe", {"model": self.describe.model} if self.describe else {}),
            ("generate", {"strong.model": self.generate.strong.model, "weak.model": self.generate.weak.model}
             if self.generate else {}),
        ):  # fmt: skip
            section = getattr(self, stage)
            ex = section.executor if section is not None and section.executor is not None else self.executor
            gpus = getattr(ex, "gpus_per_task", 0)
            for where, model in models.items():
                if gpus and model.tensor_parallel_size > gpus:
                    raise ValueError(
                        f"{stage}.{where}.tensor_parallel_size ({model.tensor_parallel_size}) exceeds the "
                        f"{gpus} GPU(s) per task of its executor: one vLLM engine runs in each task"
                    )
        return self

    @model_validator(mode="after")
    def _finetune_problems_held_out(self):
        """Finetuning takes HumanEval problems from the end, Best-of-N from the start: they must not meet."""
        built = self.finetune.humaneval_exec if self.finetune else None
        bon = self.evaluate.best_of_n if self.evaluate else None
        if built is None or bon is None or bon.benchmark != "humaneval":
            return self
        evaluated = bon.problems or HUMANEVAL_SIZE
        if built.problems + evaluated > HUMANEVAL_SIZE:
            raise ValueError(
                f"finetune.humaneval_exec.problems ({built.problems}) + evaluate.best_of_n.problems "
                f"({bon.problems or f'null = all {HUMANEVAL_SIZE}'}) exceed the {HUMANEVAL_SIZE} HumanEval problems: "
                "finetuning would train on problems Best-of-N evaluates; lower one of them"
            )
        return self


# --------------------------------------------------------------------------- loading


def load_spec(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read, expand, override and validate a spec file; every user mistake raises `SpecError`."""
    path = Path(path)
    data = read_spec_yaml(path)
    _check_expanded_size(data, str(path))
    data = expand_env(data)
    for item in overrides:
        apply_override(data, item)
    return validate_spec(data, source=str(path), base_dir=path.resolve().parent)


def read_spec_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SpecError(f"spec file not found: {path}")
    if not path.is_file():
        raise SpecError(f"spec path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read spec file: {exc}") from None
    try:
        data = yaml.safe_load(text)  # safe_load: language tags such as !!python/object are refused, never run
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpecError(f"{path}{where}: YAML tag not allowed in a spec: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        raise SpecError(f"{path}: spec is empty; it needs at least `name:`")
    if not isinstance(data, dict):
        raise SpecError(
            f"{path}: a spec must be a mapping of sections (name, source, ...), got a {type(data).__name__}"
        )
    return data


MAX_SPEC_NODES = 100_000  # a real spec has a few hundred values; YAML aliases can make 10^9 out of 100 lines


def _check_expanded_size(data: Any, source: str) -> None:
    """Refuse a spec whose aliases expand it beyond MAX_SPEC_NODES values (a "billion laughs" bomb).

    PyYAML builds an alias as a shared reference, so loading is cheap; everything after it (env expansion,
    validation, the resolved copy) walks the tree and pays for every repetition. Counting stops at the cap.
    """
    count = 0
    stack = [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_SPEC_NODES:
            raise SpecError(
                f"{source}: the spec expands to more than {MAX_SPEC_NODES:,} values (YAML aliases repeated "
                "inside each other?); write the values out instead"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, where: str = "") -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string value; an unset VAR without default is an error."""
    if isinstance(data, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, str):
        return data

    def sub(match: re.Match[str]) -> str:
        value = os.environ.get(match.group(1), match.group(2))
        if value is None:
            raise SpecError(f"{where}: environment variable {match.group(1)} is not set")
        return value

    return _ENV.sub(sub, data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (safely)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {item!r}: expected dotted.key=value")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise SpecError(f"--set {item!r}: empty component in key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {key}: value is not valid YAML: {str(exc).splitlines()[0]}") from None
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, here, item)]
            continue
        if not isinstance(node, dict):
            raise SpecError(f"--set {item!r}: {'.'.join(parts[:depth])} is a value, not a section")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key, item)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SpecError(f"--set {item!r}: {'.'.join(parts[:-1])} is a value, not a section")


def _list_index(node: list[Any], part: str, here: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise SpecError(f"--set {item!r}: {here}: list index out of range (list has {len(node)} items)")
    return int(part)


def validate_spec(data: dict[str, Any], source: str = "<spec>", base_dir: Path | None = None) -> Spec:
    try:
        return Spec.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        lines = [format_error(err, data) for err in exc.errors()]
        raise SpecError(f"{source}: " + "; ".join(lines)) from None


def format_error(err: dict[str, Any], data: Any) -> str:
    """`field.path: message`, with discriminator tags removed from the path and friendlier wording."""
    loc = _user_loc(err["loc"], data)
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"{loc}: unknown field{_suggest(err['loc'])}"
    messages = {
        "missing": "required field is missing",
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
        "greater_than": f"must be > {ctx.get('gt')}",
        "less_than_equal": f"must be <= {ctx.get('le')}",
        "less_than": f"must be < {ctx.get('lt')}",
    }
    msg = messages.get(kind) or err["msg"].removeprefix("Value error, ")
    return f"{loc or '<top level>'}: {msg}"


def _user_loc(loc: tuple[Any, ...], data: Any) -> str:
    """Render a pydantic location the way the user wrote it (drop union tags such as `slurm`)."""
    out: list[str] = []
    node = data
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if isinstance(node, dict) and part not in node and node.get("kind", "local") == part:
            continue  # discriminated-union tag, not a key the user wrote
        out.append(("." if out else "") + str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return "".join(out)


def _suggest(loc: tuple[Any, ...]) -> str:
    """For an unknown field, name the allowed ones (and the closest) so the fix is one edit away."""
    import difflib

    candidates: list[type[BaseModel]] = [Spec]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        tagged = list(dict.fromkeys(m for m in candidates if part in _kinds(m)))
        if tagged:  # a discriminated-union tag picks the member
            candidates = tagged
            continue
        field = next((m.model_fields[part] for m in candidates if part in m.model_fields), None)
        if field is None:
            return ""
        candidates = _models_in(field.annotation)
    if len(candidates) != 1:
        return ""
    allowed = sorted(candidates[0].model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return f"{hint}; allowed: {', '.join(allowed)}"


def _kinds(model: type[BaseModel]) -> tuple[Any, ...]:
    """The `kind` values a union member accepts (its Literal's arguments)."""
    field = model.model_fields.get("kind")
    return get_args(field.annotation) if field is not None else ()


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The model classes inside Optional[...] / Annotated[...] / list[...] / unions."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def dump_resolved(spec: Spec) -> str:
    """The validated spec as YAML, defaults filled in: what actually ran."""
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=False), sort_keys=False, allow_unicode=True)
