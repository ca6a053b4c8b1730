"""`CurateStage`: list the source, run the datatrove steps, merge their stats, print the summary.

Resuming is datatrove's: every task leaves `logs/<step>/completions/<rank>` when it finishes and a rerun
skips those tasks. Every input the tasks share (the listing, the shard list) is written once and reused,
so a resumed run reads the same files in the same order and writes the same output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datatrove.executor import SlurmPipelineExecutor
from datatrove.executor.base import PipelineExecutor

from pipelines.curate.listing import build_listing, read_listing_summary
from pipelines.curate.pipeline import CurateLayout, Step, build_executors, build_steps
from pipelines.curate.stats import build_stats, render_summary
from pipelines.errors import CodepmpError, RunError, SpecError
from pipelines.spec import LocalSource, RayExecutor, SlurmExecutor, Spec
from pipelines.stage import Stage, claim_dir
from sdk.fileio import atomic_write_json

OUTPUT_GLOB = "curate/output/*.jsonl.gz"  # relative to WORKDIR: what the describe stage reads
SLURM_POLL_S = float(os.environ.get("CODEPMP_SLURM_POLL_S", 60))  # seconds between queue checks; tests use 1


def curate_layout(spec: Spec, outdir: Path) -> CurateLayout:
    """Logs go to WORKDIR/curate/logs, or to <executor.logging_dir>/<name>-curate when the spec sets one."""
    logging_dir = spec.executor.logging_dir
    return CurateLayout(outdir, Path(logging_dir) / f"{spec.name}-curate" if logging_dir else outdir / "logs")


class CurateStage(Stage):
    """GitHub-style code -> filtered, exact- and near-deduplicated files in WORKDIR/curate/output/."""

    name = "curate"

    def __init__(self, *args: Any, echo: Callable[[str], None] = print, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.echo = echo

    def run(self) -> dict[str, Any]:
        if self.spec.source is None:
            raise RunError("curate needs a `source` section in the spec")
        layout = curate_layout(self.spec, self.outdir)
        resuming = layout.work.exists()
        if layout.logging_root != self.outdir / "logs":  # outside the workdir: ours only once marked
            claim_dir(layout.logging_root, "executor.logging_dir")
            if not resuming:  # stale completions would skip fresh work; the marker proves the folder is ours
                shutil.rmtree(layout.logging_root)
                claim_dir(layout.logging_root, "executor.logging_dir")
        listing = self._listing(layout, resuming)
        steps = build_steps(self.spec, layout)
        executors = build_executors(self.spec, steps, layout)
        self._execute(steps, executors, layout)
        stats = build_stats(steps, layout, listing)
        if stats["documents_in"] == 0:
            raise SpecError(f"source: the corpus is empty (no documents read from {self._describe_source()})")
        atomic_write_json(layout.stats, stats)
        self.echo(render_summary(stats))
        if stats["documents_out"] == 0:  # a stage that produced nothing is not done: later stages would idle on it
            drops = "; ".join(
                f"{row['step']}: " + ", ".join(f"{k} {v}" for k, v in row["dropped"].items() if v)
                for row in stats["steps"]
                if any(row["dropped"].values())
            )
            raise SpecError(
                f"filters: all {stats['documents_in']} documents were dropped ({drops or 'no drop reason recorded'}); "
                f"loosen `filters`/`dedup` (details in {layout.stats})"
            )
        shutil.rmtree(layout.work, ignore_errors=True)  # intermediate copies of the corpus: no longer needed
        return {
            "documents_in": stats["documents_in"],
            "documents_out": stats["documents_out"],
            "bytes_out": stats["bytes_out"],
            "output": OUTPUT_GLOB,
        }

    def _listing(self, layout: CurateLayout, resuming: bool) -> dict[str, Any] | None:
        source = self.spec.source
        if not isinstance(source, LocalSource):
            return None
        if resuming and layout.listing.with_suffix(".json").exists():
            return read_listing_summary(layout.listing)  # the crashed attempt's files, in its order
        return build_listing(source, layout.listing)

    def _execute(self, steps: list[Step], executors: list[PipelineExecutor], layout: CurateLayout) -> None:
        """Run the chain; a failing task becomes a RunError naming the step and its logs, not a traceback."""
        if isinstance(self.spec.executor, SlurmExecutor):
            self._submit_and_wait(executors)
            return
        if isinstance(self.spec.executor, RayExecutor):
            _init_ray(self.spec.executor.address)
        for index, (step, executor) in enumerate(zip(steps, executors, strict=True)):
            self.echo(f"  curate step {index + 1}/{len(steps)}: {step.name} ({step.tasks} task(s))")
            try:
                executor.run()  # its `depends` already ran, so this runs just this step's missing tasks
            except CodepmpError:
                raise
            except Exception as exc:
                logs = layout.logging_dir(index, step.name) / "logs"
                raise RunError(f"curate step `{step.name}` failed: {exc!r}; task logs in {logs}") from exc

    def _submit_and_wait(self, executors: list[PipelineExecutor]) -> None:
        """Submit the whole chain as dependent Slurm job arrays, then wait for the last step's completions.

        A step whose job left the queue with tasks unfinished failed: the jobs after it would wait forever on
        their dependency, so they are cancelled and the run stops with a RunError naming the step and its logs.
        """
        last = executors[-1]
        assert isinstance(last, SlurmPipelineExecutor)
        check_slurm(self.spec.executor.partition)
        try:
            last.run()
        except subprocess.CalledProcessError as exc:  # sbatch printed why just above
            raise RunError(f"executor.kind=slurm: sbatch refused a job (exit {exc.returncode}, see above)") from None
        while incomplete := len(last.get_incomplete_ranks()):
            self._raise_if_a_step_failed(executors)
            self.echo(f"  waiting for slurm: {incomplete}/{last.world_size} final tasks left (Ctrl-C is safe)")
            time.sleep(SLURM_POLL_S)

    def _raise_if_a_step_failed(self, executors: list[PipelineExecutor]) -> None:
        out = subprocess.run(["squeue", "-h", "-o", "%F %j"], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            return  # the controller is busy or restarting: look again next time
        queued = dict(line.split(maxsplit=1) for line in out.stdout.splitlines() if " " in line)  # job id -> name
        chain = [e for e in executors if isinstance(e, SlurmPipelineExecutor) and e.job_id != -1]
        for executor in chain:  # queue first, completions second: a job gone from the queue wrote them all
            if str(executor.job_id) in queued or not (missing := executor.get_incomplete_ranks()):
                continue
            # what waits on it (later steps, and datatrove's stats jobs, named like their step) would wait forever
            names = {e.job_name for e in chain}
            waiting = [j for j, name in queued.items() if name in names and int(j) > int(executor.job_id)]
            if waiting:
                subprocess.run(["scancel", *waiting], capture_output=True, check=False)
            logs = Path(executor.logging_dir.path)
            raise RunError(
                f"curate step `{logs.name.split('_', 1)[1]}` failed on slurm (job {executor.job_id}, task(s) "
                f"{', '.join(map(str, missing[:10]))} unfinished); its {len(waiting)} dependent job(s) were "
                f"cancelled; task logs in {logs / 'slurm_logs'}"
            )

    def _describe_source(self) -> str:
        source = self.spec.source
        return getattr(source, "dataset", None) or ", ".join(getattr(source, "paths", []))


def _init_ray(address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise RunError("executor.kind=ray needs Ray: pip install 'ray[default]'") from None
    if not ray.is_initialized():
        ray.init(address=address)


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
