"""The `pairs` stage: generate output -> checked, balanced preference pairs in parquet shards.

Two passes keep memory at the size of the pair metadata rather than of the texts: pass 1 streams the
generate shards through the checks and appends survivors to an uncompressed Arrow staging file; the
balancing decisions (quotas, length bias, split, shuffle) are made on small per-pair keys; pass 2 takes
each shard's rows from the memory-mapped staging file and writes it. The stage rewrites all its outputs
from its inputs on every run, so a rerun after a crash is a clean redo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from pipelines.costs import PAIR_KEEP, Flow, StagePlan
from pipelines.errors import RunError
from pipelines.pairs.balance import (
    apply_language_quotas,
    is_heldout,
    length_bias,
    rebalance_length,
    shuffled,
)
from pipelines.pairs.checks import REASONS, check_pair
from pipelines.pairs.extract import parses
from pipelines.pairs.inputs import Candidate, ReadStats, input_files, read_candidates
from pipelines.pairs.report import DropLog, write_card, write_manifest
from pipelines.pairs.writer import SCHEMA, clear_outputs, write_split
from pipelines.spec import PairsSpec, Spec
from pipelines.stage import RunLayout, Stage, read_record

LANGUAGE_QUOTA = "language_quota"
LENGTH_BIAS = "length_bias"
DUPLICATE = "duplicate_id"
STAGING = ".checked.arrow.tmp"
_BATCH_ROWS = 4096
UPSTREAM = ("curate", "describe", "generate")


def _row(candidate: Candidate) -> dict[str, Any]:
    chosen, rejected = candidate.chosen, candidate.rejected
    return {
        "prompt": candidate.prompt,
        "chosen": chosen.text,
        "rejected": rejected.text,
        "id": candidate.id,
        "language": candidate.language,
        "chosen_tokens": chosen.tokens,
        "rejected_tokens": rejected.tokens,
        "chosen_finish": chosen.finish_reason,
        "rejected_finish": rejected.finish_reason,
        "chosen_parses": parses(chosen.code, candidate.language),
        "rejected_parses": parses(rejected.code, candidate.language),
        "repo": candidate.repo,
        "path": candidate.path,
        "strong_model": candidate.strong_model,
        "weak_model": candidate.weak_model,
    }


# What balancing and the manifest need of a pair: everything but the texts.
_KEY_COLUMNS = (
    "id",
    "language",
    "chosen_tokens",
    "rejected_tokens",
    "chosen_parses",
    "rejected_parses",
    "strong_model",
    "weak_model",
)


def _key(row: dict[str, Any], index: int) -> dict[str, Any]:
    """A pair's balancing key; `index` is its row in the staging file, where its texts wait for pass 2."""
    key = {name: row[name] for name in _KEY_COLUMNS}
    key.update(index=index, chosen_chars=len(row["chosen"]), rejected_chars=len(row["rejected"]))
    return key


class PairsStage(Stage):
    """Checks, balances and writes the preference pairs (DESIGN.md §4: WORKDIR/pairs)."""

    name = "pairs"
    section = "pairs"
    reads = ("pairs",)
    writes = ("train-*.parquet", "heldout-*.parquet", "manifest.json", "README.md (dataset card)")
    feeds: ClassVar[dict[str, str]] = {"generate": "pairs reads WORKDIR/generate: add a `generate` section"}

    @classmethod
    def upstream(cls, spec: Spec) -> list[str]:
        return ["generate"]

    @classmethod
    def estimate(cls, spec: Spec, layout: RunLayout, flow: Flow) -> StagePlan:
        cfg = spec.pairs
        assert cfg is not None
        pairs = flow.docs * PAIR_KEEP
        flow.heldout_pairs = pairs * cfg.shards.heldout_fraction
        flow.train_pairs = pairs - flow.heldout_pairs
        shards = max(1, -(-int(flow.train_pairs) // cfg.shards.rows_per_shard))
        outputs = [str(layout.stage_dir(cls.name) / w) for w in cls.writes]
        outputs[0] += f" (~{shards:,} shards)"
        plan = StagePlan(
            cls.name,
            [str(layout.stage_dir("generate") / "output")],
            outputs,
            f"checks + balancing (length-bias target {cfg.balance.length_bias_target or 'off'}), "
            f"{cfg.shards.rows_per_shard:,} rows/shard",
            documents=int(pairs),
            unit="pairs",
        )
        plan.wall_basis = "one process here, CPU checks (not estimated)"
        return plan

    @property
    def config(self) -> PairsSpec:
        return self.spec.pairs or PairsSpec()

    def run(self) -> dict[str, Any]:
        outdir = self.outdir
        outdir.mkdir(parents=True, exist_ok=True)
        clear_outputs(outdir)
        files = input_files(self.layout.stage_dir("generate"))
        staging = outdir / STAGING
        try:
            stats, drops, keys = self._check(files, staging)
            summary = self._balance_and_write(stats, drops, keys, staging)
        finally:
            staging.unlink(missing_ok=True)
        return summary

    def _check(self, files: list[Path], staging: Path) -> tuple[ReadStats, DropLog, list[dict[str, Any]]]:
        """Pass 1: run every candidate through the checks; survivors go to the staging file."""
        stats, drops = ReadStats(), DropLog((DUPLICATE, *REASONS, LANGUAGE_QUOTA, LENGTH_BIAS))
        keys: list[dict[str, Any]] = []
        seen: set[str] = set()
        batch: list[dict[str, Any]] = []
        with pa.OSFile(str(staging), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            for candidate in read_candidates(files, stats):
                drops.seen += 1
                if candidate.id in seen:
                    drops.add(DUPLICATE, candidate.id)
                    continue
                seen.add(candidate.id)
                reason = check_pair(candidate.chosen, candidate.rejected, self.config.checks)
                if reason is not None:
                    drops.add(reason, candidate.id)
                    continue
                row = _row(candidate)
                keys.append(_key(row, len(keys)))
                batch.append(row)
                if len(batch) >= _BATCH_ROWS:
                    writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=SCHEMA))
                    batch = []
            if batch:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=SCHEMA))
        return stats, drops, keys

    def _balance_and_write(
        self, stats: ReadStats, drops: DropLog, checked: list[dict[str, Any]], staging: Path
    ) -> dict[str, Any]:
        """Pass 2: quotas, length bias, split and shuffle on the keys, then the shards, manifest and card."""
        balance, shards = self.config.balance, self.config.shards
        kept, cut = apply_language_quotas(checked, balance.language_quotas, balance.seed)
        drops.add_rows(LANGUAGE_QUOTA, cut)
        kept, cut = rebalance_length(kept, balance.length_bias_target, balance.length_bias_tolerance, balance.seed)
        drops.add_rows(LENGTH_BIAS, cut)
        if not kept:
            raise RunError(
                f"pairs: no pair survived ({drops.seen} candidates from {stats.records} records): "
                f"{drops.table()}; loosen pairs.checks/pairs.balance or inspect {self.layout.stage_dir('generate')}"
            )
        splits = {"train": [k for k in kept if not is_heldout(k["id"], shards.heldout_fraction)]}
        if shards.heldout_fraction > 0:
            splits["heldout"] = [k for k in kept if is_heldout(k["id"], shards.heldout_fraction)]
        with pa.memory_map(str(staging), "r") as source:
            table = pa.ipc.open_file(source).read_all()
            written = {
                split: write_split(
                    table,
                    [key["index"] for key in shuffled(rows, balance.seed)],
                    self.outdir,
                    split,
                    shards.rows_per_shard,
                    shards.compression,
                )
                for split, rows in splits.items()
            }
        manifest = write_manifest(
            self.outdir,
            config=self.config,
            upstream={stage: (read_record(self.layout, stage) or {}).get("summary") for stage in UPSTREAM},
            stats=stats,
            drops=drops,
            checked=checked,
            splits=splits,
            shards=written,
        )
        write_card(self.outdir, manifest)
        return {
            "records": stats.records,
            "candidates": drops.seen,
            "passed_checks": len(checked),
            "pairs": len(kept),
            **{split: len(rows) for split, rows in splits.items()},
            "dropped": sum(drops.counts.values()),
            "length_bias_before": round(length_bias(checked) or 0.0, 4),
            "length_bias_after": round(length_bias(kept) or 0.0, 4),
        }
