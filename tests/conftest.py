"""The suite on pytest-xdist workers (`make test`: `-n 2 --dist loadfile --no-loadscope-reorder`).

Most of the suite's wall time is single-threaded (each process it starts imports vLLM, torch and DeepSpeed; Slurm
and Ray are waited on), so two workers overlap one's imports with the other's compute: 716 s instead of 1181 s here.
Each worker's OpenMP pool gets its share of the CPUs: two vLLM engines whose pools both span the machine spin-wait
on each other (DESIGN.md §6: 13 tok/s each instead of ~60 with one thread each).
"""

from __future__ import annotations

import os

import pytest

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    # Before any test module imports torch: its pool size is fixed when it loads.
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow tests first (stable otherwise): xdist hands out whole modules in collection order, so the
    long ones start at once and the short ones fill the gaps at the end."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)
