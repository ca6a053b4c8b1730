"""Tasks that share a machine share its CPUs: each sizes its OpenMP pool to its own CPUs before torch/vLLM start.

Without it, every task's OpenMP takes all the machine's CPUs: two SmolLM2 engines side by side on 2 cores made
13-14 tokens/s each instead of 56-63 (pipelines.tasks.limit_threads).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipelines.lifetime import RUN_PID
from pipelines.spec import LocalExecutor, RayExecutor, SlurmExecutor, validate_spec
from pipelines.stage import RunLayout
from pipelines.tasks import StageTask, make_executor, task_cpus

CPUS = len(os.sched_getaffinity(0))


class ThreadProbe:
    """Stands in for a generation stage: each task writes the thread settings its engine would start with."""

    def __init__(self, spec: object, layout: RunLayout) -> None:
        self.root = layout.root

    def run_task(self, rank: int, world_size: int) -> None:
        import torch

        probe = {"omp": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads(), "pid": os.getpid()}
        (self.root / f"{rank}.json").write_text(json.dumps(probe))


def test_a_task_gets_its_executors_share_of_the_cpus():
    assert task_cpus(SlurmExecutor(kind="slurm", partition="p", cpus_per_task=3), 4) == 3
    assert task_cpus(RayExecutor(kind="ray", cpus_per_task=2), 4) == 2
    assert task_cpus(LocalExecutor(kind="local", tasks=4, workers=2), 4) == max(1, CPUS // 2)
    assert task_cpus(LocalExecutor(kind="local", tasks=2, workers=-1), 2) == max(1, CPUS // 2)
    assert task_cpus(LocalExecutor(kind="local", tasks=1, workers=1), 1) == CPUS
    assert task_cpus(LocalExecutor(kind="local", tasks=64, workers=64), 64) == 1  # never 0


@pytest.mark.skipif(CPUS < 2, reason="one CPU: nothing to share")
def test_local_workers_side_by_side_each_size_their_pool_to_their_share(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(RUN_PID, str(os.getpid()))  # as `codepmp run` sets it for its processes
    ex = LocalExecutor(kind="local", tasks=2, workers=2)
    spec = validate_spec({"name": "t"})
    task = StageTask(ThreadProbe, spec, tmp_path, task_cpus(ex, 2))  # type: ignore[arg-type]
    make_executor(ex, [task], 2, tmp_path / "logs", "t").run()
    probes = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    share = max(1, CPUS // 2)
    assert all(p["pid"] != os.getpid() for p in probes)  # they ran in worker processes
    assert [(p["omp"], p["torch"]) for p in probes] == [(str(share), share)] * 2


@pytest.mark.parametrize("case", ["whole-machine", "user-setting"])
def test_a_task_on_the_whole_machine_and_a_users_setting_are_left_alone(case: str, tmp_path: Path, monkeypatch) -> None:
    """The only task of a machine (local, 1 worker: in `codepmp run` itself, or a library caller's process) keeps
    every CPU and leaves no OMP_NUM_THREADS behind for the processes it starts later; a user's setting stays."""
    if case == "whole-machine":
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv(RUN_PID, "1")  # another process's run: this one counts as a worker
    before = os.environ.get("OMP_NUM_THREADS")
    cpus = CPUS if case == "whole-machine" else 1
    StageTask(ThreadProbe, validate_spec({"name": "t"}), tmp_path, cpus).run()  # type: ignore[arg-type]
    assert json.loads((tmp_path / "0.json").read_text())["omp"] == before
    assert os.environ.get("OMP_NUM_THREADS") == before
