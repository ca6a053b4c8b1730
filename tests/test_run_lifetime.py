"""SIGKILL of the main `codepmp run` process: its workers die with it and the next run is not locked out.

Before the fix the workers (a forked multiprocessing manager, datatrove's forkserver pool) outlived the run,
held its flock and kept writing into the workdir: every rerun was refused until someone killed them by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "codepmp"
CODEPMP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]
SPEC = """\
name: lifetime
executor: {kind: local, tasks: 6, workers: 2}
source: {kind: local, paths: [stdlib], languages: [python], limit: 1500}
"""


def session_members(sid: int) -> list[int]:
    """Pids of live processes in session `sid` (the run was started as a session leader)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def _run(spec: Path, workdir: Path) -> subprocess.Popen[str]:
    cmd = [*CODEPMP, "run", str(spec), "--until", "curate", "--workdir", str(workdir)]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


@pytest.mark.slow
def test_killing_the_run_kills_its_workers_and_frees_the_workdir(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    workdir = tmp_path / "run"
    proc = _run(spec, workdir)
    deadline = time.monotonic() + 120
    while len(session_members(proc.pid)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # wait for the workers: the run itself plus at least two more processes
    assert proc.poll() is None, proc.stdout.read()
    assert len(session_members(proc.pid)) >= 3
    os.kill(proc.pid, signal.SIGKILL)  # the main process only, as an OOM killer or `kill -9 PID` would
    proc.wait()
    deadline = time.monotonic() + 30
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_members(proc.pid)
    for pid in left:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert left == [], "workers outlived the killed run"

    rerun = _run(spec, workdir)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert "another codepmp run" not in out
    assert f"taking over the lock of an earlier run (pid {proc.pid})" in out
    assert "curate: resume" in out
