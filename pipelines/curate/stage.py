"""`CurateStage`: list the source, run the datatrove steps, merge their stats, print the summary.

Resuming is datatrove's: every task leaves `logs/<step>/completions/<rank>` when it finishes and a rerun
skips those tasks. Every input the tasks share (the listing, the shard list) is written once and reused,
so a resumed run reads the same files in the same order and writes the same output.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from pipelines.curate.listing import build_listing, read_listing_summary
from pipelines.curate.pipeline import CurateLayout, build_executors, build_steps
from pipelines.curate.stats import build_stats, render_summary
from pipelines.errors import RunError, SpecError
from pipelines.spec import LocalSource
from pipelines.stage import Stage
from pipelines.tasks import logging_root, run_executors
from sdk.fileio import atomic_write_json

log = logging.getLogger(__name__)

OUTPUT_GLOB = "curate/output/*.jsonl.gz"  # relative to WORKDIR: what the describe stage reads


class CurateStage(Stage):
    """GitHub-style code -> filtered, exact- and near-deduplicated files in WORKDIR/curate/output/."""

    name = "curate"

    def run(self) -> dict[str, Any]:
        if self.spec.source is None:
            raise RunError("curate needs a `source` section in the spec")
        resuming = (self.outdir / "work").exists()
        layout = CurateLayout(self.outdir, logging_root(self.spec, self.name, self.outdir, fresh=not resuming))
        listing = self._listing(layout, resuming)
        steps = build_steps(self.spec, layout)
        executors = build_executors(self.spec, steps, layout)
        run_executors(self.spec.executor, "curate", [s.name for s in steps], executors)
        stats = build_stats(steps, layout, listing)
        if stats["documents_in"] == 0:
            raise SpecError(f"source: the corpus is empty (no documents read from {self._describe_source()})")
        atomic_write_json(layout.stats, stats)
        log.info(render_summary(stats))
        if stats["documents_out"] == 0:  # a stage that produced nothing is not done: later stages would idle on it
            drops = "; ".join(
                f"{row['step']}: " + ", ".join(f"{k} {v}" for k, v in row["dropped"].items() if v)
                for row in stats["steps"]
                if any(row["dropped"].values())
            )
            raise SpecError(
                f"filters: all {stats['documents_in']} documents were dropped ({drops or 'no drop reason recorded'}); "
                f"loosen `filters`/`dedup` (details in {layout.stats})"
            )
        shutil.rmtree(layout.work, ignore_errors=True)  # intermediate copies of the corpus: no longer needed
        return {
            "documents_in": stats["documents_in"],
            "documents_out": stats["documents_out"],
            "bytes_out": stats["bytes_out"],
            "output": OUTPUT_GLOB,
        }

    def _listing(self, layout: CurateLayout, resuming: bool) -> dict[str, Any] | None:
        source = self.spec.source
        if not isinstance(source, LocalSource):
            return None
        if resuming and layout.listing.with_suffix(".json").exists():
            return read_listing_summary(layout.listing)  # the crashed attempt's files, in its order
        return build_listing(source, layout.listing)

    def _describe_source(self) -> str:
        source = self.spec.source
        return getattr(source, "dataset", None) or ", ".join(getattr(source, "paths", []))
