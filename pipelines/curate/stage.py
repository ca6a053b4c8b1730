"""`CurateStage`: list the source, run the datatrove steps, merge their stats, print the summary.

Resuming is datatrove's: every task leaves `logs/<step>/completions/<rank>` when it finishes and a rerun
skips those tasks. Every input the tasks share (the listing, the shard list) is written once and reused,
so a resumed run reads the same files in the same order and writes the same output.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from pipelines.costs import (
    BYTES_PER_TOKEN,
    CURATE_KEEP,
    CURATE_MB_PER_CORE_S,
    Flow,
    StagePlan,
    cores_wall,
    enabled_filters,
    source_size,
)
from pipelines.curate.listing import build_listing, read_listing_summary
from pipelines.curate.pipeline import CurateLayout, build_executors, build_steps
from pipelines.curate.stats import build_stats, render_summary
from pipelines.spec import LocalExecutor, LocalSource, RayExecutor, SlurmExecutor, Spec
from pipelines.stage import RunLayout, Stage
from pipelines.tasks import logging_root, run_executors
from sdk.errors import RunError, SpecError
from sdk.fileio import atomic_write_json

log = logging.getLogger(__name__)

OUTPUT_GLOB = "curate/output/*.jsonl.gz"  # relative to WORKDIR: what the describe stage reads


class CurateStage(Stage):
    """GitHub-style code -> filtered, exact- and near-deduplicated files in WORKDIR/curate/output/."""

    name = "curate"
    section = "source"
    reads = ("source", "filters", "dedup", "executor")
    writes = ("output/*.jsonl.gz", "stats.json", "logs/ (datatrove completions)")

    @classmethod
    def executor(cls, spec: Spec) -> LocalExecutor | SlurmExecutor | RayExecutor:
        return spec.executor

    @classmethod
    def estimate(cls, spec: Spec, layout: RunLayout, flow: Flow) -> StagePlan:
        source = spec.source
        assert source is not None
        n_docs, share, nbytes, how = source_size(spec)
        where = getattr(source, "paths", None) or [getattr(source, "dataset", "")]
        flow.mean_tokens = nbytes / BYTES_PER_TOKEN / max(n_docs * share, 1)
        flow.docs = n_docs * share * CURATE_KEEP
        flow.shards = spec.executor.tasks  # one output shard per task
        dedup = [n for n in ("exact", "minhash") if getattr(spec.dedup, n).enabled]
        mh = spec.dedup.minhash
        detail = f"{source.kind} source -> {enabled_filters(spec)} filters -> dedup {'+'.join(dedup) or 'off'}" + (
            f" (minhash {mh.buckets}x{mh.hashes_per_bucket}, threshold ~{mh.similarity_threshold:.2f})"
            if mh.enabled
            else ""
        )
        reads = (
            f"{source.kind}: {', '.join(map(str, where))} ({n_docs:,} files read, ~{n_docs * share:,.0f} "
            f"({nbytes / 1e6:,.1f} MB) within the size filter; {how})"
        )
        plan = StagePlan(
            cls.name,
            [reads],
            [str(layout.stage_dir(cls.name) / w) for w in cls.writes],
            detail,
            documents=int(flow.docs),
            input_tokens=int(nbytes / BYTES_PER_TOKEN),
            cpu_hours=nbytes / 1e6 / CURATE_MB_PER_CORE_S / 3600,
        )
        cores_wall(spec.executor, plan)
        return plan

    def run(self) -> dict[str, Any]:
        if self.spec.source is None:
            raise RunError("curate needs a `source` section in the spec")
        resuming = (self.outdir / "work").exists()
        layout = CurateLayout(
            self.outdir, logging_root(self.spec, self.name, self.spec.executor, self.outdir, fresh=not resuming)
        )
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
