"""Training settings shared by the SDK and the spec's `pretrain` / `finetune` sections.

One Pydantic model serves both `RewardModel.pretrain(**cfg)` and `codepmp run`, so the CLI and the
SDK cannot drift. This module imports nothing heavy (no torch) so spec validation stays fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


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
