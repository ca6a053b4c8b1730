"""The curate pipeline as datatrove steps and executors, built from the spec's source/filters/dedup/executor.

`build_steps` returns the ordered datatrove steps (each a pipeline + a task count); `build_executors`
turns them into datatrove executors of the spec's kind chained with `depends=`, so running the last one
runs (or, on slurm, submits) the whole chain and a rerun skips every task whose completion file exists.

Data flow between steps goes through `work/`: a writer at the end of one step and `RankShardReader`
at the start of the next, so datatrove's dedup stages see the same documents in the same order
(their signatures refer to documents by position within a task).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.executor.base import PipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from pipelines.curate import filters as code_filters
from pipelines.curate.readers import CodeFileReader, LanguageAllowlist, TakeFirst, dataset_reader
from pipelines.spec import LocalSource, Spec
from pipelines.tasks import make_executor

SHARD_NAME = "${rank}.jsonl.gz"
# Shards handed from one step to the next are read once and deleted: gzip (level 9) would cost ~25% of the run.
HANDOVER_NAME = "${rank}.jsonl"


@dataclass(frozen=True)
class CurateLayout:
    """Where the curate stage keeps things under WORKDIR/curate (see the package docstring)."""

    root: Path
    logging_root: Path

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def excluded(self) -> Path:
        return self.root / "excluded"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def listing(self) -> Path:
        return self.work / "listing.jsonl"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    def logging_dir(self, index: int, step: str) -> Path:
        return self.logging_root / f"{index:02d}_{step}"


@dataclass
class Step:
    """One datatrove executor's worth of work."""

    name: str
    pipeline: list[PipelineStep]
    tasks: int


def handover_writer(folder: Path) -> JsonlWriter:
    """Uncompressed shards for the next step (see HANDOVER_NAME)."""
    return JsonlWriter(str(folder), output_filename=HANDOVER_NAME, compression=None)


def normalized_content(doc: Document) -> bytes:
    """What exact dedup hashes: the content with whitespace runs collapsed (reindented copies match).

    Bytes, because xxhash 4 (which `datasets` installs; datatrove wants <4) refuses `str`.
    """
    return " ".join(doc.text.split()).encode("utf-8", "surrogatepass")


class CodeWordTokenizer(WordTokenizer):
    """Splits MinHash's simplified text (lowercased, punctuation removed) on whitespace.

    datatrove's default English tokenizer needs spaCy and is tuned for prose; for code, identifiers and
    keywords separated by whitespace are the natural shingle units.
    """

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return text.splitlines()

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        raise NotImplementedError("not used by MinHash")


class RankShardReader(JsonlReader):
    """Reads back the shard task `rank` wrote in the previous step (`work/<step>/<rank>.jsonl`).

    datatrove's own sharding (`files[rank::world_size]`) would shift when a task wrote no shard;
    dedup signatures index documents within a task, so task r must read exactly task r's shard.
    """

    name = "read back"

    def __init__(self, folder: str) -> None:
        super().__init__(folder, add_file_path=False)  # work/ is temporary: no path to it in the output

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        shard = f"{rank:05d}.jsonl"
        if self.data_folder.isfile(shard):
            yield from self.read_files_shard([shard])


def exclusion_writer(excluded: Path | None, step: str) -> JsonlWriter | None:
    """Where `step` keeps the files it drops when `filters.keep_dropped` is on (None: they are not kept)."""
    return JsonlWriter(str(excluded / step), output_filename=SHARD_NAME) if excluded else None


def code_filters_from_spec(spec: Spec, excluded: Path | None) -> list[PipelineStep]:
    """The enabled code filters in order, cheapest and most fundamental first."""
    f = spec.filters
    candidates: list[tuple[bool, type[code_filters.BaseFilter], dict]] = [
        (f.binary.enabled, code_filters.BinaryFilter, {}),
        (f.size.enabled, code_filters.SizeFilter, {"min_bytes": f.size.min_bytes, "max_bytes": f.size.max_bytes}),
        (f.license.enabled, code_filters.LicenseFilter, {"allow": f.license.allow}),
        (f.min_lines.enabled, code_filters.MinLinesFilter, {"min_lines": f.min_lines.min_lines}),
        (f.max_line.enabled, code_filters.MaxLineFilter, {"max_chars": f.max_line.max_chars}),
        (f.mean_line.enabled, code_filters.MeanLineFilter, {"max_chars": f.mean_line.max_chars}),
        (f.alphanumeric.enabled, code_filters.AlphanumericFilter, {"min_fraction": f.alphanumeric.min_fraction}),
        (f.autogenerated.enabled, code_filters.AutogeneratedFilter, {"head_lines": f.autogenerated.head_lines}),
        (f.encoded_data.enabled, code_filters.EncodedDataFilter, f.encoded_data.model_dump(exclude={"enabled"})),
    ]
    return [
        cls(**kwargs, exclusion_writer=exclusion_writer(excluded, cls.name)) for on, cls, kwargs in candidates if on
    ]


def reader_steps(spec: Spec, layout: CurateLayout) -> list[PipelineStep]:
    """The reading end of the first step: the source's reader plus, for datasets, limit and allowlist."""
    source = spec.source
    assert source is not None, "curate needs a source section"
    if isinstance(source, LocalSource):
        max_bytes = spec.filters.size.max_bytes if spec.filters.size.enabled else None
        return [CodeFileReader(layout.listing, max_bytes=max_bytes)]
    steps: list[PipelineStep] = [dataset_reader(source, layout.work / "inputs.txt")]
    if source.limit is not None:
        steps.append(TakeFirst(source.limit))
    if source.languages:
        steps.append(LanguageAllowlist(source.languages))
    return steps


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=normalized_content)


def minhash_config(spec: Spec) -> MinhashConfig:
    mh = spec.dedup.minhash
    return MinhashConfig(
        n_grams=mh.ngram,
        num_buckets=mh.buckets,
        hashes_per_bucket=mh.hashes_per_bucket,
        seed=mh.seed,
        hash_config=HashConfig(hash_fc="sha1"),  # MinHash hashes str shingles, which xxhash 4 refuses
        # Accents in code are rare and meaningful; skipping their normalisation makes signatures ~15% cheaper.
        norm_config=TextNormConfig(norm_unicode_diacritics=False),
    )


def hand_over(spec: Spec, layout: CurateLayout, folder: str, next_dedup: str | None) -> list[PipelineStep]:
    """The end of a document step: write the shard the next dedup reads plus its signatures, or the output."""
    if next_dedup is None:
        return [CorpusCounter(), JsonlWriter(str(layout.output), output_filename=SHARD_NAME)]
    shard = handover_writer(layout.work / folder)
    if next_dedup == "exact":
        return [shard, ExactDedupSignature(str(layout.work / "exact" / "sigs"), config=exact_config())]
    sigs = layout.work / "minhash" / "sigs"
    return [shard, MinhashDedupSignature(str(sigs), config=minhash_config(spec), language=CodeWordTokenizer())]


def build_steps(spec: Spec, layout: CurateLayout) -> list[Step]:
    """The datatrove steps of the curate stage, in dependency order; disabled dedups are left out."""
    tasks, work = spec.executor.tasks, layout.work
    excluded = layout.excluded if spec.filters.keep_dropped else None
    exact, minhash = spec.dedup.exact.enabled, spec.dedup.minhash.enabled
    first_dedup = "exact" if exact else ("minhash" if minhash else None)
    documents = [*reader_steps(spec, layout), *code_filters_from_spec(spec, excluded)]
    steps = [Step("filter", documents + hand_over(spec, layout, "filtered", first_dedup), tasks)]
    current = work / "filtered"
    if exact:
        dups = work / "exact" / "dups"
        drop = ExactDedupFilter(
            str(dups), config=exact_config(), exclusion_writer=exclusion_writer(excluded, "exact_dedup")
        )
        steps += [
            Step("exact_find", [ExactFindDedups(str(work / "exact" / "sigs"), str(dups), config=exact_config())], 1),
            Step(
                "exact_filter",
                [
                    RankShardReader(str(current)),
                    drop,
                    *hand_over(spec, layout, "deduped", "minhash" if minhash else None),
                ],
                tasks,
            ),
        ]
        current = work / "deduped"
    if minhash:
        root, config = work / "minhash", minhash_config(spec)
        drop = MinhashDedupFilter(str(root / "remove"), exclusion_writer=exclusion_writer(excluded, "minhash_dedup"))
        steps += [
            Step(
                "minhash_buckets",
                [MinhashDedupBuckets(str(root / "sigs"), str(root / "buckets"), config=config)],
                config.num_buckets,
            ),
            Step(
                "minhash_cluster", [MinhashDedupCluster(str(root / "buckets"), str(root / "remove"), config=config)], 1
            ),
            Step(
                "minhash_filter", [RankShardReader(str(current)), drop, *hand_over(spec, layout, "output", None)], tasks
            ),
        ]
    return steps


class CorpusCounter(PipelineStep):
    """Counts what reaches the output: documents, bytes and documents per language (for stats.json)."""

    name = "output"
    type = "📊 - STATS"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("documents")
            self.stat_update("bytes", value=code_filters.size_bytes(doc), unit="doc")
            self.stat_update(f"language_{doc.metadata.get('language')}")
            yield doc


def build_executors(spec: Spec, steps: list[Step], layout: CurateLayout) -> list[PipelineExecutor]:
    """One datatrove executor per step, of the spec's kind, each `depends`-ing on the one before."""
    executors: list[PipelineExecutor] = []
    for index, step in enumerate(steps):
        depends = executors[-1] if executors else None
        logs = layout.logging_dir(index, step.name)
        name = f"{spec.name}-curate-{step.name}"
        executors.append(make_executor(spec.executor, step.pipeline, step.tasks, logs, name, depends))
    return executors
