"""`codepmp plan`'s wall clock: GPU-hours over the GPUs (or cores) a stage keeps busy, and idle-resource warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.plan import StagePlan, build_plan, plan_as_dict, render_plan
from pipelines.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "specs" / "github_19b.yaml"
IDLE = "would sit idle"


def plan(tmp_path: Path, *overrides: str, path: Path = PAPER) -> dict[str, StagePlan]:
    return {p.stage: p for p in build_plan(load_spec(path, overrides=list(overrides)), tmp_path)}


def idle_warnings(stage: StagePlan) -> list[str]:
    return [n for n in stage.notes if IDLE in n]


def test_paper_plan_has_a_positive_wall_clock_per_stage(tmp_path: Path):
    stages = plan(tmp_path)
    for name in ("curate", "describe", "generate", "pretrain", "evaluate"):
        assert stages[name].wall_hours > 0, name
    # describe/generate run 64 one-GPU tasks at once: their wall clock is their GPU-hours over 64
    for name in ("describe", "generate"):
        assert stages[name].wall_hours == pytest.approx(stages[name].gpu_hours / 64)
    # Best-of-N sampling: 164 problems in 21 units of 8, one one-GPU task each
    assert stages["evaluate"].wall_hours == pytest.approx(stages["evaluate"].gpu_hours / 21)
    # training runs as one process on one GPU, said in a note
    assert stages["pretrain"].wall_hours == pytest.approx(stages["pretrain"].gpu_hours)
    assert any("one GPU" in n for n in stages["pretrain"].notes)
    assert not any(IDLE in n for s in stages.values() for n in s.notes)  # the shipped spec wastes nothing


def test_doubling_describe_workers_halves_its_wall_clock(tmp_path: Path):
    base = plan(tmp_path)
    doubled = plan(tmp_path, "describe.executor.workers=128")
    assert doubled["describe"].gpu_hours == pytest.approx(base["describe"].gpu_hours)
    assert doubled["describe"].wall_hours == pytest.approx(base["describe"].wall_hours / 2)
    assert doubled["generate"].wall_hours == pytest.approx(base["generate"].wall_hours)  # its own executor


def test_idle_tasks_warned_only_beyond_curate_shards(tmp_path: Path):
    curate_tasks = load_spec(PAPER).executor.tasks
    assert not idle_warnings(plan(tmp_path, f"describe.executor.tasks={curate_tasks}")["describe"])
    over = plan(tmp_path, f"describe.executor.tasks={curate_tasks + 500}", "describe.executor.workers=-1")
    (warning,) = idle_warnings(over["describe"])
    assert f"500 of {curate_tasks + 500:,} tasks" in warning and "curate shards" in warning
    # idle tasks add no speed: the wall clock is bounded by the shards' worth of GPUs
    assert over["describe"].wall_hours == pytest.approx(over["describe"].gpu_hours / curate_tasks)


def test_gpus_beyond_tensor_parallel_are_warned_and_not_counted(tmp_path: Path):
    base = plan(tmp_path)
    wide = plan(tmp_path, "describe.executor.gpus_per_task=2")["describe"]
    assert any("gpus_per_task (2)" in n and IDLE in n for n in wide.notes)
    assert wide.wall_hours == pytest.approx(base["describe"].wall_hours)


def test_gpu_sized_generation_without_gpus_is_warned(tmp_path: Path):
    cpu_only = plan(tmp_path, "describe.executor.gpus_per_task=0")["describe"]
    assert any("no GPUs" in n for n in cpu_only.notes)
    assert cpu_only.wall_hours > plan(tmp_path)["describe"].wall_hours
    local = plan(tmp_path, path=REPO / "specs" / "ci_small.yaml")  # a 135M model on this machine: nothing to say
    assert not any("no GPUs" in n or IDLE in n for s in local.values() for n in s.notes)
    assert local["describe"].wall_hours == pytest.approx(local["describe"].cpu_hours)


def test_render_and_json_show_the_wall_clock(tmp_path: Path):
    spec = load_spec(PAPER, overrides=["describe.executor.tasks=4000"])
    plans = build_plan(spec, tmp_path)
    text = render_plan(spec, tmp_path, plans)
    walls = [line for line in text.splitlines() if line.startswith("     wall   ")]
    assert len(walls) == len(plans)
    assert "64 tasks at once x 1 GPU(s) each" in walls[1]
    assert "wall clock ~" in text and f"warning: 2,000 of 4,000 tasks {IDLE}" in text
    data = plan_as_dict(spec, tmp_path, plans)
    assert data["totals"]["wall_hours"] == pytest.approx(sum(s["wall_hours"] for s in data["stages"]))


def test_evaluate_tasks_beyond_its_sampling_units_are_warned(tmp_path: Path):
    over = plan(tmp_path, "evaluate.executor.tasks=40", "evaluate.executor.workers=-1")["evaluate"]
    (warning,) = idle_warnings(over)
    assert "19 of 40 tasks" in warning and "units of 8 problems (21)" in warning
    assert over.wall_hours == pytest.approx(over.gpu_hours / 21)
