"""What a run logged, for tests that check its progress lines (the CLI prints the same lines on stdout)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def logged(name: str = "pipelines") -> Iterator[list[str]]:
    """Collect the messages of logger `name` (INFO and up) while the block runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler, level = logging.getLogger(name), Collect(), logging.getLogger(name).level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
