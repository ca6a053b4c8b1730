"""`codepmp run`: stage order, skip-if-done, resume-if-crashed and the run layout, implemented once.

Each stage keeps a record in `WORKDIR/<stage>/_stage.json` with its fingerprint: the hash of the spec
sections it reads chained with the fingerprints of the stages it reads from. On rerun a stage is
skipped when its record says done with the same fingerprint, resumed when it says running with the
same fingerprint (a crash), and started afresh when the fingerprint changed (its outputs are stale).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.lifetime import RunProcesses
from pipelines.report import stage_records, write_report
from pipelines.spec import Spec, dump_resolved
from pipelines.stage import MARKER, RECORD, RunLayout, Stage, claim_dir, read_record
from pipelines.stages import check_inputs, declared, declared_names, stage_class
from pipelines.tasks import check_executor
from sdk.engine import close_idle
from sdk.errors import RunError, SpecError
from sdk.fileio import atomic_write_json, atomic_write_text

LOCK = ".lock"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    stage: str
    action: str  # "skip" | "resume" | "start"
    reason: str


def resolve_workdir(spec: Spec, override: str | os.PathLike[str] | None = None) -> Path:
    """--workdir (relative to the CWD) > spec.workdir (relative to the spec) > ./runs/<name>."""
    if override is not None:
        return Path(override).expanduser().resolve()
    if spec.workdir is not None:
        return Path(spec.workdir).resolve()
    return (Path.cwd() / "runs" / spec.name).resolve()


def select_stages(spec: Spec, only: str | None = None, until: str | None = None) -> list[str]:
    """The declared stages to run, in pipeline order, narrowed by --only / --until."""
    if only and until:
        raise SpecError("use either --only or --until, not both")
    names = declared_names(spec)
    for flag, stage in (("--only", only), ("--until", until)):
        if stage is not None and stage not in names:
            raise SpecError(f"{flag} {stage}: the spec declares no such stage (declared: {', '.join(names)})")
    if only:
        return [only]
    if until:
        return names[: names.index(until) + 1]
    return names


def fingerprints(spec: Spec) -> dict[str, str]:
    """Per declared stage: hash of its own sections chained with its upstream stages' fingerprints."""
    prints: dict[str, str] = {}
    for cls in declared(spec):
        parts = [cls.section_hash(spec)] + [f"{up}={prints[up]}" for up in cls.upstream(spec)]
        prints[cls.name] = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return prints


def output_manifest(outdir: Path) -> dict[str, Any]:
    """Every file a finished stage left in its directory (size, mtime) and one digest over them all.

    Recorded when the stage finishes; a skipped stage is checked against it, and each stage records the
    digests of the upstream outputs it read, so a stage rebuilt under it is noticed downstream.
    Sizes and mtimes rather than content hashes: checking must stay cheap on a corpus of hundreds of GB.
    """
    files = {}
    for path in sorted(outdir.rglob("*")):
        if path.is_file() and path.name != RECORD:
            info = path.stat()
            files[path.relative_to(outdir).as_posix()] = [info.st_size, info.st_mtime_ns]
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    return {"files": files, "digest": digest}


def outputs_problem(layout: RunLayout, stage: str, record: dict[str, Any]) -> str | None:
    """Why a finished stage's outputs no longer match its record (None when they do)."""
    recorded = record.get("outputs")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict):
        return "its record lists no outputs (written by an older codepmp)"
    outdir = layout.stage_dir(stage)
    changed = []
    for name, (size, mtime) in sorted(recorded["files"].items()):
        path = outdir / name
        try:
            info = path.stat()
        except OSError:
            changed.append(f"{stage}/{name} is missing")
            continue
        if info.st_size != size:
            changed.append(f"{stage}/{name} is {info.st_size} bytes, was {size}")
        elif info.st_mtime_ns != mtime:
            changed.append(f"{stage}/{name} was modified")
    if not changed:
        return None
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    return f"its outputs changed since it finished: {changed[0]}{more}"


def _upstream_rebuilt(spec: Spec, layout: RunLayout, stage: str, record: dict[str, Any]) -> list[str]:
    """Upstream stages whose outputs are not the ones this stage was built from."""
    built_from = record.get("upstream_outputs", {})
    rebuilt = []
    for up in stage_class(stage).upstream(spec):
        up_record = read_record(layout, up) or {}
        if built_from.get(up) != (up_record.get("outputs") or {}).get("digest"):
            rebuilt.append(up)
    return rebuilt


def decide(spec: Spec, layout: RunLayout, stage: str, prints: dict[str, str], force: bool = False) -> Decision:
    """What to do with one stage given its record on disk, and why (printed to the user)."""
    record = read_record(layout, stage)
    if force:
        return Decision(stage, "start", "--force")
    if record is None:
        return Decision(stage, "start", "first run")
    if record.get("status") == "corrupt":
        return Decision(stage, "start", f"its record {stage}/{RECORD} is unreadable")
    if record.get("fingerprint") == prints[stage]:
        rebuilt = _upstream_rebuilt(spec, layout, stage, record)
        if rebuilt:
            return Decision(stage, "start", f"upstream stage {', '.join(rebuilt)} was rebuilt since")
        if record.get("status") == "done":
            problem = outputs_problem(layout, stage, record)
            if problem is not None:
                return Decision(stage, "start", problem)
            return Decision(stage, "skip", "already done with this spec")
        return Decision(stage, "resume", "resuming an interrupted attempt")
    cls = stage_class(stage)
    if record.get("section_hash") != cls.section_hash(spec):
        return Decision(stage, "start", f"spec section(s) {', '.join(cls.reads)} changed")
    built_from = record.get("upstream", {})
    changed = [up for up in stage_class(stage).upstream(spec) if built_from.get(up) != prints[up]]
    return Decision(stage, "start", f"upstream stage {', '.join(changed) or 'set'} changed")


def claim_workdir(root: Path) -> None:
    """Make sure `root` may hold a run: it is new or empty (then it is marked as ours), or it is a codepmp run.

    Anything else is refused before a single file is written: a user's directory is never mixed with a run,
    so nothing a run later deletes (stale stage outputs, `--force`) can be a file codepmp did not write.
    """
    if (root / LOCK).is_file() and (root / "spec.resolved.yaml").is_file() and not (root / MARKER).exists():
        atomic_write_json(root / MARKER, {"created": "before markers", "by": "codepmp run"})  # an older run
    claim_dir(root, "workdir", MARKER)


_LOCKED: set[Path] = set()  # POSIX locks do not exclude the owning process from itself: this does


@contextmanager
def workdir_lock(root: Path) -> Iterator[None]:
    """One `codepmp run` per workdir at a time: two would corrupt each other's resume state.

    A POSIX record lock, not flock: it belongs to this process alone, so worker processes forked from it
    never keep it alive, and the kernel releases it the moment this process dies, SIGKILL included. The
    owner's pid is kept in the file for the messages.
    """
    path = root / LOCK
    try:
        handle = open(path, "a+")  # noqa: SIM115 (closed below, after the lock is released)
    except OSError as exc:
        raise SpecError(f"workdir {root}: cannot write there ({exc.strerror or exc})") from None
    with handle:
        handle.seek(0)
        previous = handle.read().strip()
        if root in _LOCKED:
            raise RunError(f"another codepmp run is using {root}; wait for it or pick another --workdir")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = f" (pid {previous})" if previous else ""
            raise RunError(
                f"another codepmp run{owner} is using {root}; wait for it or pick another --workdir"
            ) from None
        if previous.isdigit() and int(previous) != os.getpid():
            log.info(f"note: taking over the lock of an earlier run (pid {previous}) that is gone")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _LOCKED.add(root)
        try:
            yield
        finally:
            _LOCKED.discard(root)
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.lockf(handle, fcntl.LOCK_UN)


def run_spec(
    spec: Spec,
    workdir: Path,
    only: str | None = None,
    until: str | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Run the selected stages in order; returns one result dict per stage.

    Progress goes to the `pipelines` logger (INFO): the CLI prints it; a library caller configures or
    silences it like any other logger.
    """
    check_inputs(spec)
    selected = select_stages(spec, only, until)
    if not selected:
        raise SpecError("the spec declares no stage: add a `source` section (or another stage's section)")
    layout = RunLayout(workdir)
    prints = fingerprints(spec)
    results = []
    claim_workdir(workdir)
    with workdir_lock(workdir), RunProcesses():
        atomic_write_text(layout.resolved_spec, dump_resolved(spec))
        log.info(f"run {spec.name}: {len(selected)} stage(s) -> {workdir}")
        try:
            for index, stage in enumerate(selected, 1):
                _check_upstream_done(spec, layout, stage, prints)
                decision = decide(spec, layout, stage, prints, force)
                log.info(f"[{index}/{len(selected)}] {stage}: {decision.action} ({decision.reason})")
                if decision.action == "skip":
                    results.append({"stage": stage, "action": "skip", **(read_record(layout, stage) or {})})
                    continue
                results.append(_run_one(spec, layout, stage_class(stage), decision, prints))
        finally:
            close_idle()
            _report(spec, layout)
    return results


def _report(spec: Spec, layout: RunLayout) -> None:
    """WORKDIR/report.md after every run, a failed one too (it shows what finished); never masks the failure."""
    if not stage_records(layout):
        return
    try:
        log.info(f"report: {write_report(spec, layout)}")
    except Exception as exc:  # the run's own outcome (or error) is what the user must see
        log.warning(f"note: the report could not be written ({type(exc).__name__}: {exc})")


def _check_upstream_done(spec: Spec, layout: RunLayout, stage: str, prints: dict[str, str]) -> None:
    for up in stage_class(stage).upstream(spec):
        record = read_record(layout, up) or {}
        if record.get("status") != "done" or record.get("fingerprint") != prints[up]:
            raise RunError(
                f"stage `{stage}` reads the output of `{up}`, which is not finished for this spec in "
                f"{layout.root}: run `codepmp run SPEC --until {up}` first"
            )
        problem = outputs_problem(layout, up, record)
        if problem is not None:
            raise RunError(
                f"stage `{stage}` reads the output of `{up}`, but {problem}: "
                f"run `codepmp run SPEC --until {up}` to rebuild it"
            )


def record_done(spec: Spec, layout: RunLayout, stage: str, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record `stage` as done with whatever its directory holds now: for outputs made outside `codepmp run`
    (tests, data imported from elsewhere) that later stages should read as that stage's outputs."""
    record = _new_record(spec, layout, stage, fingerprints(spec))
    record.update(status="done", summary=summary or {}, outputs=output_manifest(layout.stage_dir(stage)))
    atomic_write_json(layout.stage_dir(stage) / RECORD, record)
    return record


def _new_record(spec: Spec, layout: RunLayout, stage: str, prints: dict[str, str]) -> dict[str, Any]:
    """What a stage is built from: its fingerprint, its upstream stages' fingerprints and their outputs' digests."""
    cls = stage_class(stage)
    ups = cls.upstream(spec)
    return {
        "stage": stage,
        "fingerprint": prints[stage],
        "section_hash": cls.section_hash(spec),
        "upstream": {up: prints[up] for up in ups},
        "upstream_outputs": {up: (read_record(layout, up) or {}).get("outputs", {}).get("digest") for up in ups},
    }


def _run_one(
    spec: Spec,
    layout: RunLayout,
    cls: type[Stage],
    decision: Decision,
    prints: dict[str, str],
) -> dict[str, Any]:
    stage = decision.stage
    outdir = layout.stage_dir(stage)
    ex = cls.executor(spec)
    if ex is not None:
        check_executor(ex)  # an unknown partition or an unreachable cluster: one error, before anything is written
    if decision.action == "start" and outdir.exists():
        if any(p.name != RECORD for p in outdir.iterdir()):
            log.info(f"  discarding previous {stage} outputs in {outdir}")
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    record = {
        **_new_record(spec, layout, stage, prints),
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(outdir / RECORD, record)
    start = time.monotonic()
    instance = cls(spec, layout)
    close_idle(keep=instance.first_model())  # the previous stage's engine, unless this stage loads it first
    try:
        summary = instance.run()
    except BaseException as exc:
        log.error(
            f"  {stage} stopped after {time.monotonic() - start:.1f}s ({type(exc).__name__}); "
            "finished work is kept: rerun the same command to resume"
        )
        raise
    elapsed = time.monotonic() - start
    record.update(status="done", seconds=round(elapsed, 2), summary=summary, outputs=output_manifest(outdir))
    atomic_write_json(outdir / RECORD, record)
    figures = ", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, int | float | str))
    log.info(f"  {stage} done in {elapsed:.1f}s" + (f": {figures}" if figures else ""))
    return {"action": decision.action, **record}
