"""Read the `generate` stage's output into candidate pairs (the input contract of the `pairs` stage).

`WORKDIR/generate/output/*.jsonl.gz` holds one record per instruction with `strong` and `weak` sample
lists; sample i of strong is paired with sample i of weak, and the pair id is `<id>-<i>`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.languages import normalize_language
from pipelines.pairs.checks import Side
from pipelines.pairs.extract import extract_code
from pipelines.shards import read_shard_lines, stage_shards
from sdk.errors import DataError, RunError

_REQUIRED = ("id", "prompt", "strong", "weak")


@dataclass(frozen=True)
class Candidate:
    """One (strong sample i, weak sample i) pair with the source record's provenance."""

    id: str
    prompt: str
    language: str | None
    repo: str | None
    path: str | None
    strong_model: str | None
    weak_model: str | None
    chosen: Side
    rejected: Side


@dataclass
class ReadStats:
    """What the reader saw besides pairs: counted in the manifest."""

    files: int = 0
    records: int = 0
    unpaired_samples: int = 0  # samples of the side with more samples than the other (no partner)


def input_files(generate_dir: Path) -> list[Path]:
    """The generate shards, sorted by name; a missing or empty output dir is a clear error."""
    output = generate_dir / "output"
    files = stage_shards(generate_dir)
    if not files:
        raise RunError(f"pairs: no generate output in {output} (expected *.jsonl.gz): run the `generate` stage first")
    return files


def _side(record: dict[str, Any], key: str, where: str) -> tuple[str | None, list[dict[str, Any]]]:
    side = record[key]
    if not isinstance(side, dict) or not isinstance(side.get("samples"), list):
        raise DataError(f"{where}: `{key}` must be an object with a `samples` list")
    return side.get("model"), side["samples"]


def _make_side(sample: Any, language: str | None, where: str) -> Side:
    if not isinstance(sample, dict) or not isinstance(sample.get("text"), str):
        raise DataError(f"{where}: each sample needs a string `text`")
    tokens = sample.get("tokens")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise DataError(f"{where}: sample `tokens` must be a non-negative integer, got {tokens!r}")
    text = sample["text"]
    return Side(text, sample.get("finish_reason"), tokens, extract_code(text, language))


def read_candidates(files: list[Path], stats: ReadStats) -> Iterator[Candidate]:
    """Every candidate pair of every record, in file then line order; malformed records raise `DataError`."""
    for path in files:
        stats.files += 1
        for lineno, record in read_shard_lines(path):
            where = f"{path}:{lineno}"
            missing = [key for key in _REQUIRED if key not in record]
            if missing:
                raise DataError(f"{where}: record lacks {', '.join(missing)}")
            stats.records += 1
            language = normalize_language(record.get("language"))
            strong_model, strong = _side(record, "strong", where)
            weak_model, weak = _side(record, "weak", where)
            stats.unpaired_samples += abs(len(strong) - len(weak))
            for i, (good, bad) in enumerate(zip(strong, weak, strict=False)):
                yield Candidate(
                    id=f"{record['id']}-{i}",
                    prompt=str(record["prompt"]),
                    language=language,
                    repo=record.get("repo"),
                    path=record.get("path"),
                    strong_model=strong_model,
                    weak_model=weak_model,
                    chosen=_make_side(good, language, f"{where} strong sample {i}"),
                    rejected=_make_side(bad, language, f"{where} weak sample {i}"),
                )
