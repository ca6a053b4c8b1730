"""jsonl.gz shards between generation stages: read in a fixed order, written atomically."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sdk.errors import DataError
from sdk.fileio import atomic_path


def stage_shards(stage_dir: Path) -> list[Path]:
    """A stage's output shards (`<stage>/output/*.jsonl.gz`), in name order: the order every reader uses."""
    return sorted((stage_dir / "output").glob("*.jsonl.gz"))


def read_shard_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of one shard; a corrupt shard or line is an error naming file and line."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path}:{line_no}: not a JSON object ({exc})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_no}: not a JSON object")
                yield line_no, record
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable shard ({exc}); rerun the stage that wrote it") from None


def read_shards(files: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Records of every shard, files in the given order."""
    for path in files:
        for _, record in read_shard_lines(path):
            yield record


def write_shard(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write a gzip JSON-lines shard via a temp file and rename: readers never see half a shard.

    No timestamp and no file name in the gzip header (it would carry the random temp name): the same records
    give the same bytes, so runs can be compared byte for byte.
    """
    count = 0
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as handle,
    ):
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode())
            count += 1
    return count


def chunks(path: Path, size: int) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A shard's records in chunks of `size`, each named `<shard>-<chunk>`: a generation task's unit of work.

    Only one chunk is in memory at a time, whatever the shard's size. An empty shard has no chunk.
    """
    stem, chunk = path.name.removesuffix(".jsonl.gz"), []
    index = 0
    for record in read_shards([path]):
        chunk.append(record)
        if len(chunk) == size:
            yield f"{stem}-{index:05d}", chunk
            chunk, index = [], index + 1
    if chunk:
        yield f"{stem}-{index:05d}", chunk
