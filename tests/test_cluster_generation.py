"""describe and generate as datatrove tasks: in 1 and 3 local tasks, a one-node Slurm job array and a local Ray cluster.

`specs/ci_small.yaml`, shrunk (fewer files, shorter replies), is curated once into 3 shards and run to `pairs` from
there: with describe and generate in ONE local task (the reference), in 3 local tasks SIGKILLed in the second task
then rerun, as 2-task Slurm arrays and as 2 Ray tasks. Every generation and every pair must be byte-identical
(per-request seeds, input unit i to task i mod tasks, outputs named after their input unit): neither the task
count, nor where a task runs, nor a kill may change what is written; and the rerun after the kill must leave the
finished task's output untouched and not pay again for a request finished before the kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.pairs.checks import check_pair
from pipelines.pairs.inputs import ReadStats, input_files, read_candidates
from pipelines.spec import load_spec
from tests.test_cluster_executors import PARTITION, VENV_ACTIVATE, job_name, slurm_cluster  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "ci_small.yaml"
SMALL = [
    "executor={kind: local, tasks: 3, workers: 1}",  # curate: 3 shards, the input units of the tasks below
    "source.limit=170",  # 6 files pass ci_small's size filter
    "pairs.checks.drop_truncated=false",  # short replies are cut: keep them, the pairs only need to exist
    "pairs.shards.heldout_fraction=0.0",  # every pair in train-*: the checks below read them all
    "describe.sampling.max_new_tokens=24",
    "generate.strong.sampling.max_new_tokens=48",
    "generate.weak.sampling.max_new_tokens=24",
]
ONE_TASK = "{kind: local, tasks: 1, workers: 1}"
THREE_TASKS = "{kind: local, tasks: 3, workers: 1}"  # one after another in the CLI's process
TIMEOUT_S = 600


def _command(workdir: Path, executor: str, until: str, name: str = "gen-cluster") -> tuple[list[str], dict[str, str]]:
    sets = [*SMALL, f"name={name}", f"describe.executor={executor}", f"generate.executor={executor}"]
    cmd = [sys.executable, "-m", "cli.main", "run", str(SPEC), "--workdir", str(workdir), "--until", until]
    cmd += [arg for item in sets for arg in ("--set", item)]
    return cmd, {**os.environ, "DS_ACCELERATOR": "cpu", "CODEPMP_SLURM_POLL_S": "1"}


def _run(
    workdir: Path, executor: str, until: str = "pairs", env: dict[str, str] | None = None, name: str = "gen-cluster"
) -> str:
    cmd, base = _command(workdir, executor, until, name)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env={**base, **(env or {})})
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _written(workdir: Path) -> dict[str, bytes]:
    """Every generation and pair shard the run wrote, by path in the workdir (gzip without timestamps)."""
    files = [*(workdir / "describe" / "output").iterdir(), *(workdir / "generate" / "output").iterdir()]
    files += (workdir / "pairs").glob("*.parquet")
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(files)}


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared input: curate alone, locally (its own cluster runs are tests/test_cluster_executors.py)."""
    workdir = tmp_path_factory.mktemp("curated") / "run"
    _run(workdir, ONE_TASK, until="curate")
    assert len(list((workdir / "curate" / "output").glob("*.jsonl.gz"))) == 3
    return workdir


def _from_curated(curated: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(curated, workdir)  # file times kept: the curate record still matches its outputs
    return workdir


@pytest.fixture(scope="module")
def reference(curated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """describe and generate in one local task each."""
    workdir = _from_curated(curated, tmp_path_factory.mktemp("local"))
    out = _run(workdir, ONE_TASK)
    assert "curate: skip" in out
    assert sorted(p.name for p in (workdir / "generate" / "logs").iterdir()) == ["1-tasks"]
    return workdir


@pytest.fixture(scope="module")
def reference_files(reference: Path) -> dict[str, bytes]:
    """What the reference wrote, read once for every comparison below."""
    return _written(reference)


def test_pairs_are_real_and_pass_every_check(reference: Path) -> None:
    rows = [
        row
        for shard in sorted((reference / "pairs").glob("train-*.parquet"))
        for row in pq.read_table(shard).to_pylist()
    ]
    assert len(rows) >= 4, "too few pairs survived to say anything"
    assert json.loads((reference / "pairs" / "manifest.json").read_text())  # written next to the shards
    spec = load_spec(SPEC, overrides=SMALL)
    candidates = {c.id: c for c in read_candidates(input_files(reference / "generate"), ReadStats())}
    for row in rows:
        candidate = candidates[row["id"]]
        assert check_pair(candidate.chosen, candidate.rejected, spec.pairs.checks) is None
        assert row["chosen"].strip() and row["rejected"].strip() and row["chosen"] != row["rejected"]
        assert row["strong_model"] == "smollm2-135m-instruct"
        assert row["weak_model"] == "smollm2-135m-instruct[prune 14+14]"
        assert row["path"].endswith(".py") and row["language"] == "python"
    describe = [
        json.loads(line) for f in sorted((reference / "describe" / "cache").glob("*.jsonl")) for line in f.open()
    ]
    assert all(len(d["samples"][0]["text"]) > 20 for d in describe[:3])  # the describer wrote instructions


def _cached_ids(path: Path) -> list[str]:
    ids = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line torn by the kill
            ids.append(json.loads(line)["rid"])
    return ids


def test_three_tasks_killed_in_one_then_rerun_redo_only_its_unfinished_requests_and_match_one_task(
    curated: Path, reference_files: dict[str, bytes], tmp_path: Path
) -> None:
    workdir = _from_curated(curated, tmp_path)
    _run(workdir, THREE_TASKS, until="describe")
    caches = workdir / "generate" / "cache" / "strong"
    units = sorted(p.name.removesuffix(".jsonl.gz") for p in (workdir / "describe" / "output").iterdir())
    assert len(units) == 3, units  # one input unit per task
    task_units = [units[rank::3] for rank in range(3)]  # generate's input unit i goes to task i mod 3

    def task_caches(rank: int) -> list[Path]:
        return [f for unit in task_units[rank] for f in caches.glob(f"{unit}-*.jsonl")]

    cmd, env = _command(workdir, THREE_TASKS, "pairs")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and not sum(len(_cached_ids(f)) for f in task_caches(1)):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the tasks it runs
    proc.communicate()
    completions = workdir / "generate" / "logs" / "3-tasks" / "completions"
    assert sorted(p.name for p in completions.iterdir()) == ["00000"], "the kill should land in task 1"
    outputs = [p for unit in task_units[0] for p in (workdir / "generate" / "output").glob(f"{unit}-*.jsonl.gz")]
    assert len(outputs) >= len(task_units[0]), "task 0 wrote its outputs before task 1 started"
    first_task = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs}
    before = {f.name: _cached_ids(f) for f in task_caches(1)}

    out = _run(workdir, THREE_TASKS)
    assert "generate: resume" in out and "describe: skip" in out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first_task} == first_task, (
        "task 0's output was rewritten"
    )
    for name, ids in before.items():
        after = _cached_ids(caches / name)
        assert after[: len(ids)] == ids and len(after) == len(set(after)), f"{name}: a finished request was redone"
    assert sorted(p.name for p in completions.iterdir()) == ["00000", "00001", "00002"]
    assert _written(workdir) == reference_files, "3 tasks (killed, rerun) wrote other files than 1 task"


def test_slurm_generation_matches_local(
    curated: Path,
    reference_files: dict[str, bytes],
    tmp_path: Path,
    slurm_cluster: dict[str, str],  # noqa: F811
    job_name: str,  # noqa: F811
) -> None:
    workdir = _from_curated(curated, tmp_path)
    executor = (
        f"{{kind: slurm, partition: {PARTITION}, tasks: 2, workers: 2, time: '00:15:00', mem_per_cpu_gb: 4, "
        f"env_command: 'source {VENV_ACTIVATE}'}}"
    )
    out = _run(workdir, executor, env=slurm_cluster, name=job_name)
    assert "submitted slurm job" in out
    for stage in ("describe", "generate"):
        logs = workdir / stage / "logs" / "2-tasks"
        assert (logs / "launch_script.slurm").is_file()  # it really went through sbatch
        assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000", "00001"]
    assert _written(workdir) == reference_files


def test_ray_generation_matches_local(curated: Path, reference_files: dict[str, bytes], tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    workdir = _from_curated(curated, tmp_path)
    _run(workdir, "{kind: ray, tasks: 2, workers: 2, cpus_per_task: 1, mem_per_cpu_gb: 2}")
    assert sorted(p.name for p in (workdir / "generate" / "logs" / "2-tasks" / "completions").iterdir()) == [
        "00000",
        "00001",
    ]
    assert _written(workdir) == reference_files
