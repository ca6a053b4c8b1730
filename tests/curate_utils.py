"""Helpers shared by the tests/test_curate_*.py suites: build specs, run the stage, read what it wrote."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from pipelines.runner import run_spec
from pipelines.spec import Spec, validate_spec
from tests.logs import logged


def make_spec(tmp_path: Path, source: dict[str, Any], **sections: Any) -> Spec:
    data = {"name": "curate-test", "executor": {"kind": "local", "tasks": 1, "workers": 1}, "source": source}
    data.update(sections)
    return validate_spec(data, base_dir=tmp_path)


def run_curate(spec: Spec, workdir: Path) -> list[str]:
    """Run the curate stage through the runner (as `codepmp run --until curate` does); returns what it printed."""
    with logged() as printed:
        run_spec(spec, workdir, until="curate")
    return printed


def read_shards(folder: Path) -> list[dict[str, Any]]:
    """Every document in a folder of datatrove jsonl.gz shards, shard by shard in name order."""
    docs = []
    for shard in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as handle:
            docs.extend(json.loads(line) for line in handle)
    return docs


def stats_rows(workdir: Path) -> dict[str, dict[str, Any]]:
    stats = json.loads((workdir / "curate" / "stats.json").read_text())
    return {row["step"]: row for row in stats["steps"]}
