"""The pairs stage's account of itself: `manifest.json` (machine-readable) and the dataset card `README.md`.

One report of counts in/out per stage, drops by reason with sample ids, token/length statistics and the
length-bias figure (DESIGN.md §8: users ask for exactly this in one place).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.pairs.balance import length_bias
from pipelines.pairs.extract import EXTRACTION_RULE
from pipelines.pairs.inputs import ReadStats
from pipelines.pairs.writer import COLUMNS
from pipelines.spec import PairsSpec
from sdk.fileio import atomic_write_json, atomic_write_text

SAMPLE_IDS = 5

COLUMN_DOCS: dict[str, str] = {
    "prompt": "the user message both generators answered (instruction in the generation template, no chat markup)",
    "chosen": "the strong model's full reply",
    "rejected": "the weak model's full reply",
    "id": "`<source doc id>-<sample index>`",
    "language": "programming language of the source file",
    "chosen_tokens": "length of the chosen reply in generator tokens",
    "rejected_tokens": "length of the rejected reply in generator tokens",
    "chosen_finish": "why generation stopped for chosen (`stop` / `length`)",
    "rejected_finish": "why generation stopped for rejected",
    "chosen_parses": "extracted code of chosen parses (Python via `ast`; null where no parser is at hand)",
    "rejected_parses": "extracted code of rejected parses (same rule)",
    "repo": "source repository (null for local corpora)",
    "path": "source file path",
    "strong_model": "model that wrote chosen",
    "weak_model": "model that wrote rejected",
}


@dataclass
class DropLog:
    """Drop counts by reason, in a fixed reason order, with the first few ids of each for inspection."""

    reasons: tuple[str, ...]
    seen: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, pair_id: str) -> None:
        self.counts[reason] += 1
        ids = self.samples.setdefault(reason, [])
        if len(ids) < SAMPLE_IDS:
            ids.append(pair_id)

    def add_rows(self, reason: str, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.add(reason, row["id"])

    def table(self) -> str:
        """`reason=count, ...` for every reason (zeros included, so the reader sees what was checked)."""
        return ", ".join(f"{reason}={self.counts[reason]}" for reason in self.reasons)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {r: {"count": self.counts[r], "sample_ids": self.samples.get(r, [])} for r in self.reasons}


def _summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean / median / p90 (nearest rank) / max of a list of lengths."""
    if not values:
        return {"mean": None, "median": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(ordered), 2),
        "median": statistics.median(ordered),
        "p90": ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)],
        "max": ordered[-1],
    }


def _parse_share(rows: Sequence[dict[str, Any]], column: str) -> float | None:
    known = [row[column] for row in rows if row[column] is not None]
    return round(sum(known) / len(known), 4) if known else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def write_manifest(
    outdir: Path,
    *,
    config: PairsSpec,
    upstream: dict[str, dict[str, Any] | None],
    stats: ReadStats,
    drops: DropLog,
    checked: Sequence[dict[str, Any]],
    splits: dict[str, Sequence[dict[str, Any]]],
    shards: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """Write `manifest.json` and return it. `checked` = pairs after the checks, `splits` = pairs written."""
    written = [row for rows in splits.values() for row in rows]
    manifest = {
        "stages": {
            **{stage: summary for stage, summary in upstream.items() if summary is not None},
            "pairs": {
                "in_files": stats.files,
                "in_records": stats.records,
                "in_candidates": drops.seen,
                "unpaired_samples": stats.unpaired_samples,
                "passed_checks": len(checked),
                "out": len(written),
                **{f"out_{split}": len(rows) for split, rows in splits.items()},
            },
        },
        "drops": drops.as_dict(),
        "length_bias": {
            "definition": "share of pairs whose chosen reply has more tokens than the rejected one",
            "before": _round(length_bias(checked)),
            "after": _round(length_bias(written)),
            **{f"after_{split}": _round(length_bias(rows)) for split, rows in splits.items()},
            "target": config.balance.length_bias_target,
            "tolerance": config.balance.length_bias_tolerance,
            "ties": sum(row["chosen_tokens"] == row["rejected_tokens"] for row in written),
        },
        "stats": {
            column: _summary([row[column] for row in written])
            for column in ("chosen_tokens", "rejected_tokens", "chosen_chars", "rejected_chars")
        },
        "parses": {side: _parse_share(written, f"{side}_parses") for side in ("chosen", "rejected")},
        "languages": dict(sorted(Counter(str(row["language"]) for row in written).items())),
        "models": {
            "strong": sorted({str(row["strong_model"]) for row in written}),
            "weak": sorted({str(row["weak_model"]) for row in written}),
        },
        "shards": shards,
        "columns": list(COLUMNS),
        "config": config.model_dump(mode="json", exclude={"executor"}),  # where it ran does not change the data
    }
    atomic_write_json(outdir / "manifest.json", manifest)
    return manifest


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_card(outdir: Path, manifest: dict[str, Any]) -> None:
    """Write the dataset card (`README.md`, with Hub front matter naming the splits) from the manifest."""
    counts = manifest["stages"]["pairs"]
    bias = manifest["length_bias"]
    config = manifest["config"]
    splits = list(manifest["shards"])
    front = ["---", "license: other", "configs:", "- config_name: default", "  data_files:"]
    front += [f"  - split: {split}\n    path: {split}-*.parquet" for split in splits]
    front.append("---")
    upstream = [(stage, summary) for stage, summary in manifest["stages"].items() if stage != "pairs"]
    sections = [
        "\n".join(front),
        "# CodePMP code preference pairs",
        "Preference pairs for reward-model pretraining in the manner of CodePMP (arXiv 2410.02229): a describer "
        "model wrote, for each source file, the instruction it answers; a strong model's reply is `chosen`, a "
        "weaker model's reply to the same prompt is `rejected`.\n\n"
        f"- strong model(s): {', '.join(manifest['models']['strong'])}\n"
        f"- weak model(s): {', '.join(manifest['models']['weak'])}",
        "## How it was made",
        "Pairs were dropped when either side is empty or only an empty code fence, when a side was cut off by "
        f"the token limit (drop_truncated={config['checks']['drop_truncated']}), when a side is a repetition "
        f"loop (share >= {config['checks']['repetition_max_line_share']}), or when the two codes are identical or "
        "near-identical (difflib ratio over code tokens >= "
        f"{config['checks']['near_identical_similarity']}). Code extraction:\n"
        + "\n".join("> " + line for line in EXTRACTION_RULE.splitlines())
        + f"\n\nBalancing (seed {config['balance']['seed']}): language quotas "
        f"{config['balance']['language_quotas'] or 'none'}; length-bias target "
        f"{bias['target'] if bias['target'] is not None else 'none (natural distribution kept)'}"
        + (f" ± {bias['tolerance']}" if bias["target"] is not None else "")
        + ". The heldout split is chosen by a hash of the pair id, so a pair never changes split when others "
        "are added. Rows are shuffled deterministically.",
        "## Columns",
        _table(("column", "meaning"), COLUMN_DOCS.items()),
        "## Counts",
        _table(
            ("step", "figures"),
            [(stage, ", ".join(f"{k}={v}" for k, v in summary.items())) for stage, summary in upstream]
            + [("pairs", ", ".join(f"{k}={v}" for k, v in counts.items()))],
        ),
        "Dropped pairs by reason (first ids in `manifest.json`):\n\n"
        + _table(("reason", "pairs"), [(r, d["count"]) for r, d in manifest["drops"].items()]),
        "## Length bias",
        f"Share of pairs where chosen has more tokens than rejected (the accuracy of a reward model that only "
        f"measures length): **{bias['before']}** after the checks, **{bias['after']}** as written "
        f"({bias['ties']} ties). Lengths as written, in tokens and characters:\n\n"
        + _table(
            ("", "mean", "median", "p90", "max"),
            [(name, *stat.values()) for name, stat in manifest["stats"].items()],
        )
        + f"\n\nShare of extracted code that parses: chosen {manifest['parses']['chosen']}, "
        f"rejected {manifest['parses']['rejected']}.",
        "## Files",
        _table(
            ("split", "shard", "rows"),
            [(split, shard["file"], shard["rows"]) for split, shards in manifest["shards"].items() for shard in shards],
        ),
        "Load from this directory with:\n\n```python\nfrom datasets import load_dataset\n\n"
        f'ds = load_dataset("parquet", data_files={ {split: f"{split}-*.parquet" for split in splits} })\n```',
        "## License",
        "The prompts are derived from source files and the replies are model outputs conditioned on them: the "
        "licenses of the source code (see `repo` / `path`) follow the source, and the generators' output terms "
        "follow the models' licenses. Check both before redistributing.",
    ]
    atomic_write_text(outdir / "README.md", "\n\n".join(sections) + "\n")
