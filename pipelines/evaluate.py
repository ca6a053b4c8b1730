"""`evaluate`: the trained reward model's accuracy on held-out pairs and its Best-of-N curves.

Reads the model (`evaluate.model`, else `WORKDIR/finetune/final` when the spec finetunes, else
`WORKDIR/pretrain/final`) and the held-out pairs (`evaluate.heldout`, else `WORKDIR/pairs/heldout-*.parquet`).
Writes `WORKDIR/evaluate/results.json` and a PNG of each BoN curve (`bon_humaneval.png`, `bon_math.png`).

Best-of-N samples are drawn and executed by datatrove tasks on `evaluate.executor` (else the top-level
executor): problems go in units of UNIT_PROBLEMS, unit i to task i mod tasks, each unit's samples into
`samples/unit-<i>.jsonl` and their sandbox labels into `samples/unit-<i>.exec.jsonl`.

Resumable: HumanEval samples (one request per sample) and execution labels are appended as they finish,
and reward scores are saved (`scores.json`) once computed, so a rerun after a kill pays only for the work
that was not finished. Samples are drawn before the reward model is loaded, so the generator and the reward
model never hold memory at the same time.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from pathlib import Path
from typing import Any, ClassVar

from pipelines.costs import HUMANEVAL_PROBLEMS, Flow, StagePlan, driver_wall, gen_plan, model_str, task_wall
from pipelines.spec import LocalExecutor, RayExecutor, SlurmExecutor, Spec
from pipelines.stage import DistributedStage, RunLayout
from sdk import sandbox
from sdk.engine import close_idle
from sdk.errors import RunError
from sdk.fileio import atomic_write_json

UNIT_PROBLEMS = 8  # Best-of-N problems per sampling unit (164 HumanEval problems: 21 units to share out)
MATH_DRAWS = 20  # draws for the math curves when the spec has no best_of_n section to take them from


class EvaluateStage(DistributedStage):
    """Held-out pair accuracy, Best-of-N on HumanEval and math curves for the trained reward model."""

    name = "evaluate"
    section = "evaluate"
    reads = ("evaluate",)
    writes = ("results.json", "*.png", "samples/ (Best-of-N candidates)")
    feeds: ClassVar[dict[str, str]] = {
        "finetune": "evaluate scores the trained model: add `finetune`/`pretrain` or set evaluate.model",
        "pretrain": "evaluate scores the trained model: add `pretrain` or set evaluate.model",
        "pairs": "evaluate reads WORKDIR/pairs/heldout-*: add a `pairs` section or set evaluate.heldout",
    }

    @classmethod
    def upstream(cls, spec: Spec) -> list[str]:
        cfg = spec.evaluate
        assert cfg is not None
        needs = []
        if cfg.model is None:
            needs.append("finetune" if spec.finetune else "pretrain")
        if cfg.heldout is None:
            needs.append("pairs")
        return needs

    @classmethod
    def executor(cls, spec: Spec) -> LocalExecutor | SlurmExecutor | RayExecutor | None:
        """Best-of-N sampling runs as tasks (one engine each); without it, everything runs in the driver."""
        return super().executor(spec) if spec.evaluate and spec.evaluate.best_of_n else None

    @classmethod
    def estimate(cls, spec: Spec, layout: RunLayout, flow: Flow) -> StagePlan:
        cfg = spec.evaluate
        assert cfg is not None
        outputs = [str(layout.stage_dir(cls.name) / w) for w in cls.writes]
        plan = StagePlan(cls.name, [], outputs, "RM accuracy on held-out pairs", unit="pairs")
        plan.reads.append(cfg.heldout or str(layout.stage_dir("pairs") / "heldout-*.parquet"))
        plan.documents = int(flow.heldout_pairs)
        if cfg.best_of_n:
            bon = cfg.best_of_n
            problems = bon.problems or HUMANEVAL_PROBLEMS
            pt, nt, gpu, cpu, size = gen_plan(problems * bon.k, 150, (bon.generator.model, bon.generator.sampling))
            plan.detail += (
                f"; Best-of-N on HumanEval: {problems} problems x k={bon.k} from {model_str(bon.generator.model, size)}"
            )
            plan.input_tokens, plan.generated_tokens = int(pt), int(nt)
            plan.gpu_hours, plan.cpu_hours = gpu, cpu
            where = "evaluate.executor" if cfg.executor is not None else "executor"
            units = math.ceil(problems / UNIT_PROBLEMS)
            split = f"units of {UNIT_PROBLEMS} problems ({{shards:,}}); fewer tasks are enough,"
            task_wall(plan, cls.executor(spec), where, [bon.generator.model], units, split)  # the sampling
        else:
            driver_wall(spec, plan)
        return plan

    def run(self) -> dict[str, Any]:
        cfg = self.spec.evaluate
        assert cfg is not None
        from sdk import humaneval as he

        bon = cfg.best_of_n
        problems, replies, labels = [], {}, []
        if bon is not None:
            problems = he.load_problems(bon.problems)
            self.run_tasks()  # samples and labels, a task per share of the units; then read back from their caches
            for index, unit in enumerate(sample_units(problems)):
                unit_replies = he.sample(unit, bon.generator, bon.k, self.sample_cache(index))
                replies |= unit_replies
                labels += self.unit_labels(index, unit, unit_replies)
            close_idle()  # an engine a task left in this process: the reward model comes next

        from sdk import RewardModel
        from sdk.evaluation import evaluate_math, heldout_accuracy, humaneval_bon, plot_bon

        model_path = self.model_path()
        rm = RewardModel.from_pretrained(model_path)
        results: dict[str, Any] = {"model": model_path}
        heldout = self.heldout_pattern()
        if heldout is None:
            results["heldout"] = {"skipped": f"no held-out pairs in {self.layout.stage_dir('pairs')}"}
        else:
            results["heldout"] = {"data": heldout, **heldout_accuracy(rm, heldout)}
        summary: dict[str, Any] = {}
        if "accuracy" in results["heldout"]:
            summary |= {"accuracy": round(results["heldout"]["accuracy"], 4), "heldout_pairs": results["heldout"]["n"]}

        if bon is not None:
            scores = self._scores(rm, model_path, problems, replies)
            # `benchmark` names the result key, the plot and the headline keys (HumanEval is the only one today).
            results[bon.benchmark] = {
                "generator": bon.generator.model_dump(mode="json"),
                "sandbox": {**bon.sandbox.model_dump(), "layers": sandbox.layers()},
                **humaneval_bon(
                    problems,
                    replies,
                    rm,
                    draws=bon.draws,
                    timeout_s=bon.sandbox.timeout_s,
                    memory_mb=bon.sandbox.memory_mb,
                    labels=labels,
                    scores=scores,
                ),
            }
            curve = results[bon.benchmark]["curve"]
            plot_bon(curve, self.outdir / f"bon_{bon.benchmark}.png", "HumanEval best-of-N")
            summary |= _headline(bon.benchmark, curve)
        if cfg.math_data is not None:
            draws = bon.draws if bon is not None else MATH_DRAWS
            results["math"] = {"data": cfg.math_data, **evaluate_math(cfg.math_data, rm, draws=draws)}
            plot_bon(results["math"]["curve"], self.outdir / "bon_math.png", Path(cfg.math_data).name)
            summary |= _headline("math", results["math"]["curve"])
        atomic_write_json(self.outdir / "results.json", results)
        return summary

    def run_task(self, rank: int, world_size: int) -> None:
        """Sample and execute the units `[rank::world_size]`, each into its own caches (named after the unit, so
        they are the same files whatever the number of tasks); one engine serves all of the task's units."""
        from sdk import humaneval as he

        cfg = self.spec.evaluate
        assert cfg is not None and cfg.best_of_n is not None
        bon = cfg.best_of_n
        units = list(enumerate(sample_units(he.load_problems(bon.problems))))
        for index, unit in units[rank::world_size]:
            replies = he.sample(unit, bon.generator, bon.k, self.sample_cache(index), desc=f"evaluate unit {index}")
            self.unit_labels(index, unit, replies)

    def unit_labels(self, index: int, unit: list[dict[str, Any]], replies: dict[str, list[str]]) -> list[dict]:
        """Sandbox labels of a unit's samples, in problem then sample order; cached per program as each finishes
        (`samples/unit-<i>.exec.jsonl`), so a rerun executes only what was not labelled."""
        from sdk import humaneval as he
        from sdk.evaluation import label_programs

        bon = self.spec.evaluate.best_of_n if self.spec.evaluate else None
        assert bon is not None
        sources = [he.program(p, he.completion_from_reply(p, r)) for p in unit for r in replies[p["task_id"]]]
        cache = self.sample_cache(index).with_suffix(".exec.jsonl")
        limits = {"timeout_s": bon.sandbox.timeout_s, "memory_mb": bon.sandbox.memory_mb}
        return label_programs(sources, **limits, cache_path=cache, desc=f"humaneval unit {index}")

    def sample_cache(self, unit: int) -> Path:
        return self.outdir / "samples" / f"unit-{unit:05d}.jsonl"

    def model_path(self) -> str:
        """The reward model to evaluate: the spec's, else the last trained one."""
        cfg = self.spec.evaluate
        assert cfg is not None
        if cfg.model is not None:
            return cfg.model
        stage = "finetune" if self.spec.finetune is not None else "pretrain"
        final = self.layout.stage_dir(stage) / "final"
        if not final.is_dir():
            raise RunError(f"evaluate: no trained model at {final}: run the `{stage}` stage or set evaluate.model")
        return str(final)

    def heldout_pattern(self) -> str | None:
        """The held-out pairs to score: the spec's path (must exist), else the pairs stage's heldout shards."""
        cfg = self.spec.evaluate
        assert cfg is not None
        if cfg.heldout is not None:
            return cfg.heldout  # load_pairs names a missing file or an empty glob
        pattern = str(self.layout.stage_dir("pairs") / "heldout-*.parquet")
        return pattern if glob.glob(pattern) else None

    def _scores(self, rm: Any, model_path: str, problems: list[dict], replies: dict) -> dict[str, list[float]]:
        """Reward scores of every sample, computed once per model and samples (saved to scores.json)."""
        from sdk.evaluation import score_replies

        tasks = [p["task_id"] for p in problems]
        blob = json.dumps([model_path, _weights_stamp(model_path), [replies[t] for t in tasks]])
        key = hashlib.sha256(blob.encode()).hexdigest()
        path = self.outdir / "scores.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved["scores"]
        scores = score_replies(problems, replies, rm)
        atomic_write_json(path, {"key": key, "scores": scores})
        return scores


def sample_units(problems: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Problems in runs of UNIT_PROBLEMS: a task's unit of work, one vLLM batch of UNIT_PROBLEMS x k requests."""
    return [problems[i : i + UNIT_PROBLEMS] for i in range(0, len(problems), UNIT_PROBLEMS)]


def _weights_stamp(model_path: str) -> list[Any]:
    """Size and mtime of a model dir's weight files: a model rewritten in place does not reuse old scores."""
    root = Path(model_path)
    if not root.is_dir():
        return []
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.glob("*.safetensors"))]


def _headline(prefix: str, curve: dict[str, Any]) -> dict[str, Any]:
    """Figures at the largest N, for the run log."""
    k = curve["n"][-1]
    out = {
        f"{prefix}_rm_at_{k}": round(curve["rm"]["mean"][-1], 4),
        f"{prefix}_random": round(curve["random"][-1], 4),
        f"{prefix}_oracle_at_{k}": round(curve["oracle"][-1], 4),
    }
    if "weighted_vote" in curve:
        out[f"{prefix}_weighted_vote_at_{k}"] = round(curve["weighted_vote"]["mean"][-1], 4)
    return out
