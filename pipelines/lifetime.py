"""Processes a run starts die with it: a SIGKILLed `codepmp run` must not leave workers writing into its workdir.

Two ways a local run makes processes: `fork` (multiprocessing managers, anything forked while the run is
active: `os.register_at_fork` covers it) and datatrove's forkserver pool, whose workers are forked by a
server process that exits when the run dies: each datatrove task starts with `dies_with_parent`, a pipeline
callable that asks for the same signal. Slurm and Ray tasks are children of their own daemons, which already
tie them to the job.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Iterable
from typing import Any

RUN_PID = "CODEPMP_RUN_PID"  # set in the environment of a run's processes: the pid of `codepmp run` itself
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def dies_with_parent(data: Iterable[Any] | None, rank: int = 0, world_size: int = 1) -> Iterable[Any] | None:
    """First callable of a datatrove pipeline: in a worker process of a run (not the run's own process, which
    runs tasks itself when `workers: 1` and must outlive nothing), die when the parent dies."""
    run_pid = os.environ.get(RUN_PID)
    if run_pid is not None and run_pid != str(os.getpid()):
        die_with_parent()
    return data


_active = False


def _after_fork_in_child() -> None:
    if _active:
        die_with_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class RunProcesses:
    """While active (a `with` block around a run), forked children die with this process."""

    def __enter__(self) -> RunProcesses:
        global _active
        _active = True
        os.environ[RUN_PID] = str(os.getpid())
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = False
        os.environ.pop(RUN_PID, None)
