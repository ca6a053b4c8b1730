"""The `pairs` stage: generate output -> checked, balanced preference pairs in parquet shards.

Two passes keep memory at the size of the pair metadata rather than of the texts. Pass 1 runs as datatrove
tasks on `pairs.executor` (else the top-level executor): generate shard i goes to task i mod tasks, which
streams it through the checks into `checked/<shard>.arrow` (uncompressed Arrow: the survivors) and
`checked/<shard>.json` (its figures, drops and per-pair keys), its completion marker. The driver then merges the
shards' keys in name order (whatever the task count: the same keys in the same order), makes the balancing
decisions (duplicates across shards, quotas, length bias, split, shuffle) on them, and pass 2 takes each output
shard's rows from the memory-mapped checked files. A rerun checks only the shards without a marker and rewrites
the final shards, manifest and card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from pipelines.costs import PAIR_KEEP, Flow, StagePlan, workers
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
from pipelines.pairs.report import SAMPLE_IDS, DropLog, write_card, write_manifest
from pipelines.pairs.writer import SCHEMA, clear_outputs, write_split
from pipelines.spec import PairsSpec, Spec
from pipelines.stage import DistributedStage, RunLayout, read_record
from sdk.errors import RunError
from sdk.fileio import atomic_path, atomic_write_json

LANGUAGE_QUOTA = "language_quota"
LENGTH_BIAS = "length_bias"
DUPLICATE = "duplicate_id"
CHECKED = "checked"  # pass 1 output, one .arrow + .json per generate shard
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


class PairsStage(DistributedStage):
    """Checks, balances and writes the preference pairs (DESIGN.md §4: WORKDIR/pairs)."""

    name = "pairs"
    section = "pairs"
    reads = ("pairs",)
    writes = (
        "train-*.parquet",
        "heldout-*.parquet",
        "manifest.json",
        "README.md (dataset card)",
        f"{CHECKED}/ (pass 1: checked pairs per generate shard)",
    )
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
        ex = cls.executor(spec)
        assert ex is not None
        plan.wall_basis = f"{min(ex.tasks, workers(ex)):,} task(s) at once, CPU checks (not estimated)"
        return plan

    @property
    def config(self) -> PairsSpec:
        return self.spec.pairs or PairsSpec()

    def run(self) -> dict[str, Any]:
        files = input_files(self.layout.stage_dir("generate"))
        clear_outputs(self.outdir)
        self.run_tasks()  # pass 1: the checks, a task per share of the generate shards
        return self._balance_and_write(*self._merge(files))

    def _merge(self, files: list[Path]) -> tuple[ReadStats, DropLog, list[dict[str, Any]], pa.Table]:
        """The checked shards as one: figures summed, keys in shard order re-indexed into the concatenation of
        the memory-mapped survivors (a pair id met in an earlier shard is dropped as a duplicate)."""
        stats, drops = ReadStats(), DropLog((DUPLICATE, *REASONS, LANGUAGE_QUOTA, LENGTH_BIAS))
        keys: list[dict[str, Any]] = []
        tables: list[pa.Table] = []
        seen: set[str] = set()
        offset = 0
        for path in files:
            done = self.checked(path).with_suffix(".json")
            if not done.is_file():
                raise RunError(f"pairs: every task finished but {path.name} was not checked; rerun to check it")
            part = json.loads(done.read_text())
            for name, value in part["stats"].items():
                setattr(stats, name, getattr(stats, name) + value)
            drops.seen += part["seen"]
            for reason, count in part["drops"].items():
                drops.counts[reason] += count
                kept_ids = drops.samples.setdefault(reason, [])
                kept_ids += part["drop_samples"].get(reason, [])[: SAMPLE_IDS - len(kept_ids)]
            for key in part["keys"]:
                if key["id"] in seen:
                    drops.add(DUPLICATE, key["id"])
                    continue
                seen.add(key["id"])
                keys.append({**key, "index": offset + key["index"]})
            tables.append(pa.ipc.open_file(pa.memory_map(str(self.checked(path)), "r")).read_all())
            offset += tables[-1].num_rows
        return stats, drops, keys, pa.concat_tables(tables)

    def checked(self, shard: Path) -> Path:
        return self.outdir / CHECKED / (shard.name.removesuffix(".jsonl.gz") + ".arrow")

    def run_task(self, rank: int, world_size: int) -> None:
        """Pass 1 on generate shards `[rank::world_size]`: each one's survivors and figures, written atomically
        (the .json last: it marks the shard done)."""
        for path in input_files(self.layout.stage_dir("generate"))[rank::world_size]:
            done = self.checked(path).with_suffix(".json")
            if done.is_file():
                continue
            done.parent.mkdir(parents=True, exist_ok=True)
            stats, drops = ReadStats(), DropLog((DUPLICATE, *REASONS))
            with atomic_path(self.checked(path)) as tmp:
                keys = self._check([path], tmp, stats, drops)
            atomic_write_json(
                done,
                {
                    "stats": vars(stats),
                    "seen": drops.seen,
                    "drops": dict(drops.counts),
                    "drop_samples": drops.samples,
                    "keys": keys,
                },
            )

    def _check(self, files: list[Path], staging: Path, stats: ReadStats, drops: DropLog) -> list[dict[str, Any]]:
        """Run every candidate through the checks; survivors go to the staging file, their keys are returned."""
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
        return keys

    def _balance_and_write(
        self, stats: ReadStats, drops: DropLog, checked: list[dict[str, Any]], table: pa.Table
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
