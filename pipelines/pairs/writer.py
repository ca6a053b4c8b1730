"""Parquet shards in the TRL preference format, written so that a reader never sees a partial one.

Each shard is written to a hidden temp file in the output dir (`.train-00000.parquet.<random>.tmp`, which no
`*.parquet` glob matches) and renamed into place only once complete. Before writing, outputs of an earlier
attempt are removed, so a rerun rewrites the stage from its inputs and never mixes old and new shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdk.fileio import atomic_path

SCHEMA = pa.schema(
    [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("language", pa.string()),
        pa.field("chosen_tokens", pa.int64(), nullable=False),
        pa.field("rejected_tokens", pa.int64(), nullable=False),
        pa.field("chosen_finish", pa.string()),
        pa.field("rejected_finish", pa.string()),
        pa.field("chosen_parses", pa.bool_()),
        pa.field("rejected_parses", pa.bool_()),
        pa.field("repo", pa.string()),
        pa.field("path", pa.string()),
        pa.field("strong_model", pa.string()),
        pa.field("weak_model", pa.string()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
SPLITS: tuple[str, ...] = ("train", "heldout")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def clear_outputs(outdir: Path) -> None:
    """Remove shards, temp files, manifest and card of an earlier attempt (everything else is left alone)."""
    if not outdir.is_dir():
        return
    for pattern in [f"{split}-*.parquet" for split in SPLITS] + [".*.tmp", "manifest.json", "README.md"]:
        for path in outdir.glob(pattern):
            path.unlink()


def write_split(
    source: pa.Table, order: Sequence[int], outdir: Path, split: str, rows_per_shard: int, compression: str
) -> list[dict[str, Any]]:
    """Write rows `order` of `source` (in that order) as `<split>-NNNNN.parquet` shards of `rows_per_shard` rows.

    Only one shard's rows are materialised at a time (`take` on a memory-mapped source). An empty split still
    gets one empty shard, so `<split>-*.parquet` globs of downstream stages resolve. Returns [{"file", "rows"}].
    """
    codec = None if compression == "none" else compression
    source = source.select(list(COLUMNS))
    shards = []
    starts = range(0, len(order), rows_per_shard) if len(order) else [0]
    for index, start in enumerate(starts):
        chunk = source.take(pa.array(order[start : start + rows_per_shard], pa.int64()))
        name = shard_name(split, index)
        with atomic_path(outdir / name) as tmp:
            pq.write_table(chunk.cast(SCHEMA), tmp, compression=codec)
        shards.append({"file": name, "rows": chunk.num_rows})
    return shards
