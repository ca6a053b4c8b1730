"""stats.json: datatrove's per-task stats merged per step, reduced to documents in/out and drop reasons.

Merging reads every `logs/<step>/stats/<rank>.json` (datatrove writes one per finished task) rather than
the executor's own merged file, which after a resume only covers the tasks run in that attempt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datatrove.pipeline.dedup import ExactDedupFilter, MinhashDedupFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseReader
from datatrove.utils.stats import MetricStatsDict, PipelineStats, Stats

from pipelines.curate.pipeline import CorpusCounter, CurateLayout, Step
from pipelines.curate.readers import CodeFileReader, LanguageAllowlist, TakeFirst

# Steps that decide which documents go on: one row each in the stats table.
_DECIDERS = (BaseFilter, LanguageAllowlist, ExactDedupFilter, MinhashDedupFilter)
_DEDUP_LABELS = {ExactDedupFilter: "exact_dedup", MinhashDedupFilter: "minhash_dedup"}


def merge_step_stats(logging_dir: Path) -> PipelineStats:
    merged = PipelineStats()
    for file in sorted((logging_dir / "stats").glob("*.json")):
        task = PipelineStats.from_json(json.loads(file.read_text()))
        for block in task.stats:  # from_json leaves the saved values raw (ints or dicts): parse them
            block.stats = MetricStatsDict.from_dict(block.stats)
        merged += task
    return merged


def _value(stats: Stats, key: str) -> int:
    return int(stats.stats[key].total) if key in stats.stats else 0


def _count(stats: Stats, key: str) -> int:
    return int(stats.stats[key].n) if key in stats.stats else 0


def _by_prefix(stats: Stats, prefix: str) -> dict[str, int]:
    return {k.removeprefix(prefix): int(v.total) for k, v in sorted(stats.stats.items()) if k.startswith(prefix)}


def build_stats(steps: list[Step], layout: CurateLayout, listing: dict[str, Any] | None) -> dict[str, Any]:
    """The stats.json document: one row per deciding step, plus totals, bytes and languages."""
    rows: list[dict[str, Any]] = []
    if listing is not None:
        rows.append(
            {
                "step": "list",
                "in": listing["files"] + sum(listing["skipped"].values()),
                "out": listing["files"],
                "dropped": listing["skipped"],
            }
        )
    totals: dict[str, Any] = {}
    for index, step in enumerate(steps):
        merged = merge_step_stats(layout.logging_dir(index, step.name))
        for block, stats in zip(step.pipeline, merged.stats, strict=False):
            if isinstance(block, CodeFileReader):
                read, dropped = _value(stats, "files"), _by_prefix(stats, "skipped_")
                rows.append({"step": "read", "in": read, "out": _count(stats, "doc_len"), "dropped": dropped})
                totals.update(bytes_in=_value(stats, "bytes"), languages_in=_by_prefix(stats, "language_"))
            elif isinstance(block, BaseReader) and step.name == "filter":  # datatrove's dataset readers
                read = _count(stats, "doc_len")  # counted per yielded document, also when a limit stops the reader
                rows.append({"step": "read", "in": read, "out": read, "dropped": {}})
            elif isinstance(block, TakeFirst):  # readers read ahead (the HF one by batches): count what was taken
                rows[-1]["in"] = rows[-1]["out"] = _value(stats, "forwarded")
            elif isinstance(block, CorpusCounter):
                totals.update(
                    documents_out=_value(stats, "documents"),
                    bytes_out=_value(stats, "bytes"),
                    languages_out=_by_prefix(stats, "language_"),
                )
            elif isinstance(block, _DECIDERS):
                dropped = _by_prefix(stats, "dropped_")
                if not dropped and _value(stats, "dropped"):  # dedup filters drop without a reason
                    dropped = {"duplicate": _value(stats, "dropped")}
                label = _DEDUP_LABELS.get(type(block), block.name)
                rows.append(
                    {"step": label, "in": _value(stats, "total"), "out": _value(stats, "forwarded"), "dropped": dropped}
                )
    drop_reasons = {f"{r['step']}/{reason}": n for r in rows for reason, n in r["dropped"].items() if n}
    first_in = next((r["in"] for r in rows if r["step"] == "read"), 0)
    return {
        "documents_in": first_in,
        "documents_out": totals.get("documents_out", 0),
        "bytes_in": totals.get("bytes_in"),
        "bytes_out": totals.get("bytes_out", 0),
        "languages_in": totals.get("languages_in"),
        "languages_out": totals.get("languages_out", {}),
        "steps": rows,
        "drop_reasons": drop_reasons,
        "output": str(layout.output.relative_to(layout.root) / "*.jsonl.gz"),
    }


def _human(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def render_summary(stats: dict[str, Any]) -> str:
    """A few lines for the terminal: each step's in -> out with its drop reasons, then bytes and languages."""
    lines = [f"curate: {stats['documents_in']} files in -> {stats['documents_out']} out"]
    for row in stats["steps"]:
        reasons = ", ".join(f"{k} {v}" for k, v in row["dropped"].items() if v)
        lines.append(
            f"  {row['step']:<14} {row['in']:>8} -> {row['out']:<8}" + (f" dropped: {reasons}" if reasons else "")
        )
    size_in = _human(stats["bytes_in"]) if stats.get("bytes_in") is not None else "?"
    lines.append(f"  bytes: {size_in} in -> {_human(stats['bytes_out'])} out")
    top = sorted(stats["languages_out"].items(), key=lambda kv: -kv[1])[:8]
    if top:
        lines.append("  languages out: " + ", ".join(f"{lang} {n}" for lang, n in top))
    if stats["documents_out"] == 0:
        lines.append("  warning: every file was dropped; loosen `filters` (see drop reasons above)")
    return "\n".join(lines)
