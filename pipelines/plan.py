"""`codepmp plan`: the stage graph of a spec, each stage's inputs/outputs, and a size/cost estimate.

Each stage class estimates itself (`Stage.estimate`, with the cost model in `pipelines/costs.py`); this module
loops over the declared stages and prints. The assumptions are printed with every plan, so a user can see what
a number rests on. Local sources are counted on disk; hub sources use `size_hint`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipelines.costs import ASSUMPTIONS, Flow, StagePlan
from pipelines.spec import Spec
from pipelines.stage import RunLayout
from pipelines.stages import check_inputs, declared, stage_class


def build_plan(spec: Spec, workdir: Path) -> list[StagePlan]:
    """One `StagePlan` per declared stage, each stage estimating itself from what the stages before it hand on."""
    check_inputs(spec)
    layout, flow = RunLayout(workdir), Flow()
    return [cls.estimate(spec, layout, flow) for cls in declared(spec)]


def totals(plans: list[StagePlan]) -> dict[str, float]:
    keys = ("input_tokens", "generated_tokens", "train_tokens", "gpu_hours", "cpu_hours", "wall_hours")
    return {k: sum(getattr(p, k) for p in plans) for k in keys}


def plan_as_dict(spec: Spec, workdir: Path, plans: list[StagePlan]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "workdir": str(workdir),
        "executor": spec.executor.model_dump(mode="json"),
        "stages": [asdict(p) for p in plans],
        "totals": totals(plans),
        "assumptions": ASSUMPTIONS,
    }


def render_plan(spec: Spec, workdir: Path, plans: list[StagePlan]) -> str:
    ex = spec.executor
    lines = [
        f"plan for {spec.name}",
        f"  workdir:  {workdir}",
        f"  executor: {ex.kind}, {ex.tasks} task(s), {ex.workers if ex.workers > 0 else ex.tasks} at once"
        + (f", partition {ex.partition}" if ex.kind == "slurm" else ""),
        "",
    ]
    for i, p in enumerate(plans, 1):
        ups = stage_class(p.stage).upstream(spec)
        arrow = " <- " + ", ".join(ups) if ups else ""
        lines.append(f"{i}. {p.stage}{arrow}: {p.detail}")
        lines += [f"     reads  {r}" for r in p.reads] + [f"     writes {w}" for w in p.writes]
        figures = [f"{p.documents:,} {p.unit}"]
        for key, label in (
            ("input_tokens", "prompt/input tokens"),
            ("generated_tokens", "generated tokens"),
            ("train_tokens", "training tokens"),
        ):
            if getattr(p, key):
                figures.append(f"{_si(getattr(p, key))} {label}")
        figures.append(f"{p.gpu_hours:,.2f} GPU-h, {p.cpu_hours:,.2f} CPU-h here")
        lines.append("     est.   " + "; ".join(figures))
        lines.append(f"     wall   {_duration(p.wall_hours)}" + (f": {p.wall_basis}" if p.wall_basis else ""))
        lines += [f"     note   {n}" for n in p.notes]
    t = totals(plans)
    lines += [
        "",
        f"total: {_si(t['input_tokens'])} input tokens, {_si(t['generated_tokens'])} generated tokens, "
        f"{_si(t['train_tokens'])} training tokens",
        f"       ~{t['gpu_hours']:,.1f} GPU-hours (H100) or ~{t['cpu_hours']:,.2f} hours on this 2-core CPU",
        f"       wall clock {_duration(t['wall_hours'])}, stages one after another",
        "assumptions: " + "; ".join(f"{k}={v}" for k, v in ASSUMPTIONS.items()),
    ]
    return "\n".join(lines)


def _duration(hours: float) -> str:
    """Hours as a person reads them: minutes when short, days too when long."""
    if hours * 60 < 1:
        return "<1 min"
    if hours < 1:
        return f"~{hours * 60:,.0f} min"
    return f"~{hours:,.1f} h" + (f" = {hours / 24:,.1f} days" if hours >= 48 else "")


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f}{unit}"
    return f"{n:,.0f}"
