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
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from pipelines.costs import PROMPT_OVERHEAD_TOKENS, Flow, StagePlan, driver_wall, model_size_b, model_str, train_cost
from pipelines.spec import HUMANEVAL_EXEC, FinetuneSpec, PretrainSpec, Spec
from pipelines.stage import RunLayout, Stage
from sdk.config import TrainConfig
from sdk.errors import RunError

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

    writes = ("checkpoints/ (DeepSpeed)", "final/ (HF model dir)", "metrics.jsonl")

    @classmethod
    @abstractmethod
    def data(cls, spec: Spec, layout: RunLayout, flow: Flow) -> tuple[float, list[str]]:
        """(pairs it trains on as far as the plan knows, what it reads) for the estimate."""

    @classmethod
    def estimate(cls, spec: Spec, layout: RunLayout, flow: Flow) -> StagePlan:
        cfg: PretrainSpec | FinetuneSpec = getattr(spec, cls.section)
        model_name = cfg.model
        if model_name is None and spec.pretrain is not None:  # finetune starts from the pretrained RM
            model_name = spec.pretrain.model
        size = model_size_b(model_name) if model_name else None
        n_pairs, reads = cls.data(spec, layout, flow)
        seq = (
            min(cfg.max_length_tokens, flow.instr_tokens + flow.response_tokens + PROMPT_OVERHEAD_TOKENS)
            or cfg.max_length_tokens
        )
        if cfg.max_steps:
            n_pairs, epochs = cfg.max_steps * cfg.micro_batch_pairs * cfg.grad_accum_steps, 1.0
        else:
            epochs = cfg.epochs
        tokens = n_pairs * epochs * 2 * seq
        gpu, cpu = train_cost(size, tokens)
        plan = StagePlan(
            cls.name,
            reads,
            [str(layout.stage_dir(cls.name) / w) for w in cls.writes],
            f"RM {model_str(model_name or 'pretrain/final', size)}, loss {cfg.rm_coef} x ranking + "
            f"{cfg.lm_coef} x LM, ZeRO-{cfg.zero_stage} {cfg.precision}, {cfg.schedule}, lr {cfg.learning_rate:g}",
            documents=int(n_pairs),
            unit="pairs",
            train_tokens=int(tokens),
            gpu_hours=gpu,
            cpu_hours=cpu,
        )
        if not n_pairs:
            plan.notes.append("pair count unknown until the data exists")
        driver_wall(spec, plan)
        return plan

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
    section = "pretrain"
    reads = ("pretrain",)
    feeds: ClassVar[dict[str, str]] = {
        "pairs": "pretrain reads WORKDIR/pairs: add a `pairs` section or set pretrain.data"
    }

    @classmethod
    def upstream(cls, spec: Spec) -> list[str]:
        return [] if spec.pretrain and spec.pretrain.data else ["pairs"]

    @classmethod
    def data(cls, spec: Spec, layout: RunLayout, flow: Flow) -> tuple[float, list[str]]:
        assert spec.pretrain is not None
        if spec.pretrain.data is not None:
            return 0, [spec.pretrain.data]
        return flow.train_pairs, [str(layout.stage_dir("pairs") / PAIRS_GLOB)]

    def run(self) -> dict[str, Any]:
        section = self.spec.pretrain
        if section is None:
            raise RunError("pretrain needs a `pretrain` section in the spec")
        data = section.data or str(self.layout.stage_dir("pairs") / PAIRS_GLOB)
        return self.train(section.model, data, section, data)


class FinetuneStage(_TrainStage):
    """Finetuning (ranking loss) on reasoning preference pairs, from the pretrained model by default."""

    name = "finetune"
    section = "finetune"
    reads = ("finetune",)
    feeds: ClassVar[dict[str, str]] = {
        "pretrain": "finetune starts from the pretrained model: add `pretrain` or set finetune.model"
    }

    @classmethod
    def upstream(cls, spec: Spec) -> list[str]:
        return [] if spec.finetune and spec.finetune.model else ["pretrain"]

    @classmethod
    def data(cls, spec: Spec, layout: RunLayout, flow: Flow) -> tuple[float, list[str]]:
        cfg = spec.finetune
        assert cfg is not None
        built = cfg.humaneval_exec
        reads = [cfg.data] + ([str(layout.stage_dir("pretrain") / "final")] if not cfg.model else [])
        return (built.problems * built.max_pairs_per_problem if built else 0), reads

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
