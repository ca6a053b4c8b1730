"""describe and generate as datatrove tasks on real clusters: a one-node Slurm job array and a local Ray cluster.

`specs/ci_small.yaml`, shrunk (fewer files, shorter replies), runs to `pairs` three times from the same curated
shards: with describe and generate in 2 local tasks (the reference), as 2-task Slurm arrays and as 2 Ray tasks.
Every generation and every pair must be byte-identical: where a task runs must not change what it writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cluster_executors import PARTITION, VENV_ACTIVATE, job_name, slurm_cluster  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "executor={kind: local, tasks: 2, workers: 1}",  # curate: 2 shards, one per task below
    "source.limit=170",  # 6 files pass ci_small's size filter
    "pairs.checks.drop_truncated=false",  # short replies are cut: keep them, the pairs only need to exist
    "describe.sampling.max_new_tokens=24",
    "generate.strong.sampling.max_new_tokens=48",
    "generate.weak.sampling.max_new_tokens=24",
]
TIMEOUT_S = 600


def _run(workdir: Path, name: str, executor: str, until: str = "pairs", env: dict[str, str] | None = None) -> str:
    sets = [*SMALL, f"name={name}", f"describe.executor={executor}", f"generate.executor={executor}"]
    cmd = [sys.executable, "-m", "cli.main", "run", "specs/ci_small.yaml", "--workdir", str(workdir), "--until", until]
    cmd += [arg for item in sets for arg in ("--set", item)]
    env = {**os.environ, "CODEPMP_SLURM_POLL_S": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _written(workdir: Path) -> dict[str, bytes]:
    """Every generation and pair shard the run wrote, by path in the workdir."""
    files = [*(workdir / "describe" / "output").iterdir(), *(workdir / "generate" / "output").iterdir()]
    files += (workdir / "pairs").glob("*.parquet")
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(files)}


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared input: curate alone, locally (its own cluster runs are tests/test_cluster_executors.py)."""
    workdir = tmp_path_factory.mktemp("curated") / "run"
    _run(workdir, "gen-cluster", "{kind: local}", until="curate")
    assert len(list((workdir / "curate" / "output").glob("*.jsonl.gz"))) == 2
    return workdir


def _from_curated(curated: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(curated, workdir)  # file times kept: the curate record still matches its outputs
    return workdir


@pytest.fixture(scope="module")
def local_reference(curated: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    workdir = _from_curated(curated, tmp_path_factory.mktemp("local"))
    out = _run(workdir, "gen-cluster", "{kind: local, tasks: 2, workers: 1}")
    assert "curate: skip" in out
    written = _written(workdir)
    assert any(name.startswith("pairs/train-") for name in written)
    return written


def test_slurm_generation_matches_local(
    curated: Path,
    local_reference: dict[str, bytes],
    tmp_path: Path,
    slurm_cluster: dict[str, str],  # noqa: F811
    job_name: str,  # noqa: F811
) -> None:
    workdir = _from_curated(curated, tmp_path)
    executor = (
        f"{{kind: slurm, partition: {PARTITION}, tasks: 2, workers: 2, time: '00:15:00', mem_per_cpu_gb: 4, "
        f"env_command: 'source {VENV_ACTIVATE}'}}"
    )
    out = _run(workdir, job_name, executor, env=slurm_cluster)
    assert "submitted slurm job" in out
    for stage in ("describe", "generate"):
        logs = workdir / stage / "logs" / "2-tasks"
        assert (logs / "launch_script.slurm").is_file()  # it really went through sbatch
        assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000", "00001"]
    assert _written(workdir) == local_reference


def test_ray_generation_matches_local(curated: Path, local_reference: dict[str, bytes], tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    workdir = _from_curated(curated, tmp_path)
    _run(workdir, "gen-cluster", "{kind: ray, tasks: 2, workers: 2, cpus_per_task: 1, mem_per_cpu_gb: 2}")
    assert sorted(p.name for p in (workdir / "generate" / "logs" / "2-tasks" / "completions").iterdir()) == [
        "00000",
        "00001",
    ]
    assert _written(workdir) == local_reference
