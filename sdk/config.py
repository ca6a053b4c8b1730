"""Settings shared by the SDK and the spec: models, sampling (`describe`, `generate`, Best-of-N) and training
(`pretrain` / `finetune`).

One Pydantic model serves both the SDK (`RewardModel.pretrain(**cfg)`, `best_of_n(..., generator=ModelSpec(...))`)
and `codepmp run`, so the CLI and the SDK cannot drift; `pipelines.spec` builds the spec tree from these. This
module imports nothing heavy (no torch) so spec validation stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator

MAX_TOKENS = 1 << 20  # upper bound on a token count: a typo (a 10^9-token reply) is an error, not a hang


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- paths


def resolve_path(value: str, info: ValidationInfo) -> str:
    """Resolve a relative path against the spec file's directory (passed in the validation context)."""
    if "://" in value:
        return value
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return str(path)


def _resolve_model_name(value: str, info: ValidationInfo) -> str:
    """A model is a registry name, a hub id (`org/name`) or a local dir; only local dirs are resolved.

    A value counts as a local dir when it starts like a path (`/`, `.`, `~`) or exists relative to the spec.
    """
    base = (info.context or {}).get("base_dir")
    if value.startswith(("/", ".", "~")):
        return resolve_path(value, info)
    if base is not None and (Path(base) / value).is_dir():
        return str(Path(base) / value)
    return value


ModelName = Annotated[str, Field(min_length=1), AfterValidator(_resolve_model_name)]


# --------------------------------------------------------------------------- models and sampling


class PruneSpec(StrictModel):
    """Derive a weaker sibling by keeping only the first and last blocks (middle layers removed)."""

    keep_first: int = Field(gt=0)
    keep_last: int = Field(gt=0)


class ModelSpec(StrictModel):
    """A model and how vLLM serves it."""

    name: ModelName = Field(description="Registry name, local HF dir, or hub id (where a hub is reachable).")
    revision: str | None = None
    prune: PruneSpec | None = Field(None, description="Serve a weaker sibling with middle layers removed.")
    params_billion: float | None = Field(None, gt=0, description="Size for cost estimates; else from the name.")
    trust_remote_code: bool = Field(False, description="Run model code from the model dir; off unless you trust it.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: vLLM's own choice on GPU, float32 on CPU (batch-invariant generation there)."
    )
    max_model_len: int | None = Field(
        None, gt=0, le=MAX_TOKENS, description="Context length in tokens; null = model's own."
    )
    tensor_parallel_size: int = Field(
        1, gt=0, le=64, description="GPUs one vLLM engine spans; data parallelism is the stage's executor tasks."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kvcache_gib: float = Field(4, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    enforce_eager: bool = Field(
        False, description="Skip compile/graph warmup: on 2 CPU cores a 135M model loads in ~22 s instead of ~140 s."
    )

    def identity(self) -> tuple[Any, ...]:
        """What makes two model specs the same model (serving settings aside)."""
        prune = (self.prune.keep_first, self.prune.keep_last) if self.prune else None
        return (self.name, self.revision, prune)


class SamplingSpec(StrictModel):
    """vLLM sampling settings."""

    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    max_new_tokens: int = Field(1024, gt=0, le=MAX_TOKENS)
    n: int = Field(1, gt=0, le=1024, description="Samples per prompt.")
    seed: int = 0
    repetition_penalty: float = Field(1.0, gt=0)


class GeneratorSpec(StrictModel):
    model: ModelSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)


# --------------------------------------------------------------------------- training


class TrainConfig(StrictModel):
    """Reward-model training settings (CodePMP loss = rm_coef * ranking + lm_coef * LM-on-chosen)."""

    rm_coef: float = Field(1.0, ge=0, description="Weight of the pairwise ranking loss.")
    lm_coef: float = Field(1.0, ge=0, description="Weight of the next-token loss on chosen responses.")
    margin: float = Field(0.0, ge=0, description="Optional ranking margin: -logsigmoid(r_c - r_r - margin).")

    learning_rate: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "wsd", description="cosine, or warmup-stable-decay (the paper's PMP schedule)."
    )
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Share of steps spent warming up.")
    decay_ratio: float = Field(0.1, ge=0, le=1, description="wsd only: share of steps spent decaying.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a share of the peak.")

    epochs: float = Field(1.0, gt=0, description="Passes over the pairs (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    micro_batch_pairs: int = Field(4, gt=0, description="Pairs per micro-batch per process.")
    grad_accum_steps: int = Field(4, gt=0)
    max_length_tokens: int = Field(1024, gt=8, le=1 << 20, description="Prompt + response tokens per sequence.")
    grad_clip: float | None = Field(1.0, gt=0, description="Global gradient-norm clip; null disables.")

    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the hardware runs it natively (GPU, AVX512-BF16/AMX CPU), else fp32."
    )
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False
    trainable_layers: int | None = Field(
        None, ge=0, description="Train only the top N transformer blocks (+ heads); null trains all."
    )

    save_every_steps: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps.")
    ladder_checkpoints: bool = Field(
        False, description="Also checkpoint at steps growing by x2^(1/4), to trace the scaling curve."
    )
    log_every_steps: int = Field(1, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        if self.schedule == "wsd" and self.warmup_ratio + self.decay_ratio > 1:
            raise ValueError("warmup_ratio + decay_ratio must be <= 1 for the wsd schedule")
        return self


class FinetuneConfig(TrainConfig):
    """Finetuning defaults: ranking loss only, cosine schedule (the spec's `finetune` section adds its data)."""

    lm_coef: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
