"""The `curate` stage: GitHub-style code -> filtered, deduplicated files, as a datatrove pipeline.

Output contract (read by `describe`):
    WORKDIR/curate/output/*.jsonl.gz     one shard per datatrove task (`00000.jsonl.gz`, ...), each line
                                         {"text": <file content>, "id": <repo/path>,
                                          "metadata": {"repo", "path", "language", "size_bytes", "license",
                                                       "duplicate_count"}}
                                         (`duplicate_count`: exact copies of this file that were dropped,
                                         present when exact dedup is on)
                                         readable with `datatrove.pipeline.readers.JsonlReader`.
    WORKDIR/curate/stats.json            per-step documents in/out, drop reasons, bytes and languages.
    WORKDIR/curate/excluded/<step>/      dropped files per filter/dedup step (only with filters.keep_dropped;
                                         files the reader skips, e.g. empty or unreadable, are only counted).
    WORKDIR/curate/logs/<NN_step>/       datatrove logging dirs: completions/, stats/, logs/ per step.
    WORKDIR/curate/work/                 listing and intermediate shards/signatures; removed when the stage ends.

Steps (each a datatrove executor; later ones `depends` on earlier ones):
    filter          read -> code filters -> write work/filtered -> exact-dedup signatures
    exact_find      find exact duplicates (1 task)
    exact_filter    drop exact duplicates -> write work/deduped -> MinHash signatures
    minhash_buckets / minhash_cluster / minhash_filter   datatrove's MinHash stages 2-4 -> output/
Disabled dedup steps are left out and the last remaining step writes `output/`.

Which copy survives dedup is a pure function of the listing order and `executor.tasks` (task r reads
listing lines r, r+T, ...): exact dedup keeps the copy at the lowest position within its task (equal
positions: datatrove's merge order, itself fixed); MinHash keeps, of a near-duplicate pair, the copy of
the lower (task, position), and of a larger cluster datatrove's union-find root. With one task that is
the first copy in sorted path order. Reruns and resumed runs keep the same copies
(tests/test_curate_resume.py).
"""

from pipelines.curate.stage import OUTPUT_GLOB, CurateStage

__all__ = ["OUTPUT_GLOB", "CurateStage"]
