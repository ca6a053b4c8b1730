"""The curate stage on real clusters: a one-node Slurm (scripts/slurm-local.sh) and a local Ray cluster.

Each run goes through `codepmp run SPEC --until curate` in a subprocess and must write exactly the documents the
local executor writes for the same spec. The Slurm tests skip (saying why) when the local cluster is not up, the Ray
test when Ray is not installed; CI starts the cluster and installs Ray before pytest, so there they run.
"""

from __future__ import annotations

import gzip
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ROOT / "scripts" / "slurm-local.sh"
SLURM_DIR = Path(os.environ.get("CODEPMP_SLURM_DIR", "/tmp/codepmp-slurm"))
PARTITION = "local"  # the partition scripts/slurm-local.sh creates
VENV_ACTIVATE = Path(sys.prefix) / "bin" / "activate"  # the Slurm job runs in this interpreter's venv
SPEC = """\
name: {name}
executor: {executor}
source: {{kind: local, paths: [stdlib], languages: [python], limit: 200}}
"""
LOCAL = "{kind: local, tasks: 2, workers: 2}"
TIMEOUT_S = 300


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    """Decompressed content of every shard (gzip headers carry a timestamp; the documents must match)."""
    return {p.name: gzip.decompress(p.read_bytes()) for p in sorted(folder.glob("*.jsonl.gz"))}


def _curate(
    tmp: Path, executor: str, env: dict[str, str] | None = None, name: str = "cluster", timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """`codepmp run spec.yaml --until curate --workdir tmp/run` with `executor` as the spec's executor section."""
    spec = tmp / "spec.yaml"
    spec.write_text(SPEC.format(name=name, executor=executor))
    cmd = [sys.executable, "-m", "cli.main", "run", str(spec), "--until", "curate", "--workdir", str(tmp / "run")]
    env = {**os.environ, "CODEPMP_SLURM_POLL_S": "1", **(env or {})}  # the queue is checked every second, not 60
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """A clean failure: exit 1 or 2, no traceback, and the CLI's `error:` line last (datatrove logs before it)."""
    assert proc.returncode in (1, 2), f"exit {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), proc.stderr
    return last


def _output(tmp: Path, proc: subprocess.CompletedProcess[str]) -> dict[str, bytes]:
    assert proc.returncode == 0, f"codepmp run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    shards = _shard_bytes(tmp / "run" / "curate" / "output")
    assert shards, "no output shard"
    return shards


@pytest.fixture(scope="module")
def local_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The reference: the same corpus and task count on the local executor."""
    tmp = tmp_path_factory.mktemp("local")
    return _output(tmp, _curate(tmp, LOCAL))


@pytest.fixture(scope="module")
def slurm_cluster() -> dict[str, str]:
    """The environment a Slurm client needs, when scripts/slurm-local.sh reports the cluster up; else skip."""
    env = {"SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    try:
        status = subprocess.run(
            ["bash", str(SLURM_LOCAL), "status"], capture_output=True, text=True, timeout=30, env={**os.environ, **env}
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"local Slurm cluster: `scripts/slurm-local.sh status` did not answer ({exc})")
    if status.returncode != 0:
        pytest.skip(
            "local Slurm cluster is not running (`scripts/slurm-local.sh status`: "
            f"{(status.stdout + status.stderr).strip()}); start it with `scripts/slurm-local.sh start`"
        )
    return env


@pytest.fixture
def job_name(slurm_cluster: dict[str, str]) -> Iterator[str]:
    """A spec name of this test's own; its jobs (`<name>-curate-<step>`) still queued afterwards are cancelled."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    env = {**os.environ, **slurm_cluster}
    queue = subprocess.run(["squeue", "-h", "-o", "%A %j"], capture_output=True, text=True, env=env, check=False)
    ids = [
        job
        for job, _, jname in (line.partition(" ") for line in queue.stdout.splitlines())
        if jname.startswith(f"{name}-")
    ]
    if ids:
        subprocess.run(["scancel", *ids], env=env, check=False)


def _slurm_executor(partition: str = PARTITION, env_command: str = f"source {VENV_ACTIVATE}") -> str:
    return (
        f"{{kind: slurm, partition: {partition}, tasks: 2, workers: 2, time: '00:10:00', "
        f"mem_per_cpu_gb: 1, env_command: '{env_command}'}}"
    )


@pytest.mark.slow
def test_slurm_curate_matches_local(
    tmp_path: Path, local_output: dict[str, bytes], slurm_cluster: dict[str, str], job_name: str
) -> None:
    proc = _curate(tmp_path, _slurm_executor(), env=slurm_cluster, name=job_name)
    assert _output(tmp_path, proc) == local_output
    logs = tmp_path / "run" / "curate" / "logs"
    assert (logs / "00_filter" / "launch_script.slurm").is_file()  # it really went through sbatch
    assert len(list((logs / "05_minhash_filter" / "completions").iterdir())) == 2


def test_slurm_unknown_partition_is_one_clear_error(
    tmp_path: Path, slurm_cluster: dict[str, str], job_name: str
) -> None:
    proc = _curate(tmp_path, _slurm_executor("no-such-partition"), env=slurm_cluster, name=job_name)
    assert "no-such-partition" in _one_error_line(proc)


def test_slurm_without_sbatch_is_one_clear_error(tmp_path: Path) -> None:
    """No cluster needed: PATH holds only this venv's bin (no sbatch)."""
    proc = _curate(tmp_path, _slurm_executor(), env={"PATH": str(Path(sys.executable).parent)})
    assert "sbatch" in _one_error_line(proc)


def test_slurm_failed_task_is_a_run_error_not_a_hang(
    tmp_path: Path, slurm_cluster: dict[str, str], job_name: str
) -> None:
    """Every task exits 3 before it starts: the run must stop with an error naming the logs, not poll forever."""
    proc = _curate(tmp_path, _slurm_executor(env_command="exit 3"), env=slurm_cluster, name=job_name, timeout=30)
    line = _one_error_line(proc)
    match = re.search(r"task (\d+): log (\S+\.out)", line)
    assert match, line  # the failed array element by its task index, and the file Slurm wrote its output to
    assert int(match.group(1)) in (0, 1) and Path(match.group(2)).is_file(), line


@pytest.mark.slow
def test_ray_curate_matches_local(tmp_path: Path, local_output: dict[str, bytes]) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    proc = _curate(tmp_path, "{kind: ray, tasks: 2, workers: 2, cpus_per_task: 1, mem_per_cpu_gb: 1}")
    assert _output(tmp_path, proc) == local_output


def test_unreachable_ray_cluster_is_one_clear_error_before_anything_is_written(tmp_path: Path) -> None:
    """Ray's client retries a dead address for minutes (measured: still waiting after 5 min): the port is probed
    first, so the run stops within seconds, naming the address, and curate has not started."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    with socket.socket() as probe:  # a port nothing listens on: bound, then released
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _curate(tmp_path, f"{{kind: ray, address: '127.0.0.1:{port}'}}", timeout=120)
    assert _one_error_line(proc).startswith(f"error: executor.address 127.0.0.1:{port}: no Ray cluster answers")
    assert not (tmp_path / "run" / "curate").exists()
