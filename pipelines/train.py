"""The `pretrain` and `finetune` stages: the reward-model SDK's training loop run on the spec's sections.

Both train in the `codepmp run` process (single process; the SDK sets the rank variables itself) and
write the SDK's layout into their stage dir: `checkpoints/`, `final/` (HF model dir), `metrics.jsonl`,
`data_summary.json`. Resume is the SDK's: the runner keeps the dir of an interrupted attempt, and
training on the same dir continues from `checkpoints/latest` at the exact sample.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from pipelines.errors import RunError
from pipelines.spec import HUMANEVAL_EXEC, FinetuneSpec, PretrainSpec
from pipelines.stage import Stage
from sdk.config import TrainConfig

log = logging.getLogger(__name__)

# With `save_every_steps: null` a run checkpoints this many times (every tenth of its steps): a crash loses
# at most ~10% of the work, and at ~10 checkpoints the time spent writing them stays small next to training.
CHECKPOINTS_PER_RUN = 10
PAIRS_GLOB = "train-*.parquet"


def train_config(section: PretrainSpec | FinetuneSpec, n_pairs: int) -> TrainConfig:
    """The section's training settings, with a checkpoint interval filled in when the spec leaves it null."""
    cfg = TrainConfig.model_validate(section.model_dump(include=set(TrainConfig.model_fields)))
    if cfg.save_every_steps is None:
        cfg = cfg.model_copy(update={"save_every_steps": default_save_every(cfg, n_pairs)})
    return cfg


def default_save_every(cfg: TrainConfig, n_pairs: int) -> int:
    """Steps between checkpoints so that a run writes about `CHECKPOINTS_PER_RUN` of them."""
    from sdk.data import steps_for

    total = cfg.max_steps or steps_for(math.ceil(n_pairs / cfg.micro_batch_pairs), cfg.grad_accum_steps, cfg.epochs)
    return max(1, math.ceil(total / CHECKPOINTS_PER_RUN))


def prune_checkpoints(ckpt_dir: Path) -> None:
    """Keep only the checkpoint `latest` names: resume reads nothing else, and each one holds a whole model
    plus optimizer state (~0.5 GB for the 135M demo model). DeepSpeed writes `latest` after a checkpoint is
    complete, so the one it names is whole when the older ones go."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return
    keep = latest.read_text().strip()
    for old in ckpt_dir.glob("step-*"):
        if old.name != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


class _TrainStage(Stage):
    """Shared by pretrain and finetune: load the model, train on the pairs, summarise."""

    def after_step(self, step: int, row: dict[str, float]) -> None:
        """Called by the SDK after every optimizer step (and after that step's checkpoint, if any)."""
        prune_checkpoints(self.outdir / "checkpoints")

    def train(self, model: str, data: Any, section: PretrainSpec | FinetuneSpec, what: str) -> dict[str, Any]:
        from sdk import RewardModel
        from sdk.data import load_pairs
        from sdk.train import train

        table = load_pairs(data)
        cfg = train_config(section, table.num_rows)
        log.info(
            f"  {self.name}: {model} on {table.num_rows} pairs ({what}); checkpoint every {cfg.save_every_steps} "
            f"step(s) in {self.outdir / 'checkpoints'}"
        )
        start = time.monotonic()
        rm = RewardModel.from_pretrained(model, trust_remote_code=section.trust_remote_code)
        result = train(rm, table, self.outdir, cfg, on_step=self.after_step)
        last = result.history[-1] if result.history else {}
        return {
            "model": model,
            "data": what,
            "pairs": result.pairs,
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "final_loss": round(last["loss"], 6) if last else None,
            "final_accuracy": round(last["accuracy"], 4) if last else None,
            "truncated": result.truncated,
            "dropped_identical": result.dropped_identical,
            "save_every_steps": cfg.save_every_steps,
            "final": str(result.final_dir),
            "train_seconds": round(time.monotonic() - start, 2),
        }


class PretrainStage(_TrainStage):
    """CodePMP pretraining (ranking + LM-on-chosen) on the code pairs -> WORKDIR/pretrain/final."""

    name = "pretrain"

    def run(self) -> dict[str, Any]:
        section = self.spec.pretrain
        if section is None:
            raise RunError("pretrain needs a `pretrain` section in the spec")
        data = section.data or str(self.layout.stage_dir("pairs") / PAIRS_GLOB)
        return self.train(section.model, data, section, data)


class FinetuneStage(_TrainStage):
    """Finetuning (ranking loss) on reasoning preference pairs, from the pretrained model by default."""

    name = "finetune"

    def run(self) -> dict[str, Any]:
        section = self.spec.finetune
        if section is None:
            raise RunError("finetune needs a `finetune` section in the spec")
        model = section.model or str(self.layout.stage_dir("pretrain") / "final")
        extra: dict[str, Any] = {}
        if section.data == HUMANEVAL_EXEC:
            from pipelines.finetune_data import build_humaneval_exec

            assert section.humaneval_exec is not None  # the spec requires it with this data
            data, built = build_humaneval_exec(section.humaneval_exec, self.outdir / "data")
            extra = {f"exec_{k}": v for k, v in built.items() if isinstance(v, int | float | str)}
            what = f"{HUMANEVAL_EXEC} ({data})"
        else:
            data = what = section.data
        return {**self.train(model, str(data), section, what), **extra}
