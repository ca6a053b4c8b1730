"""Readers: every source becomes datatrove `Document`s with metadata repo/path/language/size_bytes/license.

- local trees, git HEADs and the stdlib: `CodeFileReader` reads the files named by the listing
  (`pipelines.curate.listing`), sharded by task like datatrove's `paths_file`;
- Hugging Face code datasets: datatrove's `HuggingFaceDatasetReader` (streaming);
- jsonl / parquet shards: datatrove's `JsonlReader` / `ParquetReader`;
the last two map the dataset's columns (`ColumnMap`: The Stack or github-code layout) with `CodeColumns`.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader
from datatrove.pipeline.readers.base import BaseReader

from pipelines.languages import language_of, normalize_language
from pipelines.spec import ColumnMap, FileShardSource, HuggingFaceSource
from sdk.errors import SpecError
from sdk.fileio import atomic_write_text


class CodeFileReader(BaseReader):
    """Reads the files of a listing; task `rank` reads lines rank, rank + world_size, ...

    Files are read as bytes and decoded as UTF-8; undecodable ones are passed on flagged
    (`metadata["undecodable"]`) so the binary filter drops them with a counted reason. Files that
    cannot be read, are empty, or exceed `max_bytes` (not read at all) are skipped and counted here.
    """

    name = "read"

    def __init__(self, listing: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        super().__init__()
        self.listing = str(listing)
        self.max_bytes = max_bytes

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        git = _GitBlobs()
        try:
            for entry in _listing_shard(self.listing, rank, world_size):
                self.stat_update("files")
                with self.track_time():
                    doc = self._read(entry, git)
                if doc is not None:
                    self.stat_update("bytes", value=doc.metadata["size_bytes"], unit="doc")
                    self.stat_update(f"language_{doc.metadata['language']}")
                    self.update_doc_stats(doc)
                    yield doc
        finally:
            git.close()

    def _read(self, entry: dict[str, Any], git: _GitBlobs) -> Document | None:
        root, rel = Path(entry["root"]), entry["path"]
        try:
            if "blob" in entry:
                size = entry["size"]
                raw = None if self.max_bytes is not None and size > self.max_bytes else git.read(root, entry["blob"])
            else:
                file = root / rel if root.is_dir() else root
                size = os.stat(file).st_size
                raw = None if self.max_bytes is not None and size > self.max_bytes else file.read_bytes()
        except OSError:
            return self._skip("unreadable")
        if raw is None:
            return self._skip("too_large")
        if not raw.strip():
            return self._skip("empty")
        metadata: dict[str, Any] = {
            "repo": entry["repo"],
            "path": rel,
            "language": language_of(rel),
            "size_bytes": len(raw),
            "license": entry.get("license"),
        }
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            metadata["undecodable"] = True
        return Document(text=text, id=f"{entry['repo']}/{rel}", metadata=metadata)

    def _skip(self, reason: str) -> None:
        self.stat_update(f"skipped_{reason}")


def _listing_shard(listing: str, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    with open(listing, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index % world_size == rank and line.strip():
                yield json.loads(line)


class _GitBlobs:
    """One long-lived `git cat-file --batch` per repository: reads HEAD blobs without a process per file."""

    def __init__(self) -> None:
        self._procs: dict[Path, subprocess.Popen[bytes]] = {}

    def _proc(self, root: Path) -> subprocess.Popen[bytes]:
        if root not in self._procs:
            self._procs[root] = subprocess.Popen(
                ["git", "-C", str(root), "cat-file", "--batch"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        return self._procs[root]

    def read(self, root: Path, blob: str) -> bytes:
        proc = self._proc(root)
        stdin, stdout = _pipes(proc)
        stdin.write(blob.encode() + b"\n")
        stdin.flush()
        header = stdout.readline().split()
        if len(header) != 3:
            raise OSError(f"git cannot read blob {blob} in {root}")
        body = stdout.read(int(header[2]))
        stdout.read(1)  # the newline after each object
        return body

    def close(self) -> None:
        for proc in self._procs.values():
            stdin, _ = _pipes(proc)
            stdin.close()
            proc.wait()
        self._procs.clear()


def _pipes(proc: subprocess.Popen[bytes]) -> tuple[IO[bytes], IO[bytes]]:
    assert proc.stdin is not None and proc.stdout is not None
    return proc.stdin, proc.stdout


class CodeColumns:
    """Adapter from a code dataset row (The Stack / github-code columns) to a datatrove document dict.

    Bound by datatrove as the reader's `adapter(reader, row, source_file, id_in_file)`. Other columns
    are dropped so every source yields the same metadata.
    """

    def __init__(self, columns: ColumnMap) -> None:
        self.columns = columns

    def __call__(self, _reader: BaseReader, row: dict[str, Any], source_file: str, id_in_file: int | str) -> dict:
        cols = self.columns
        text = row.get(cols.text)
        text = text if isinstance(text, str) else ""
        path = _column(row, cols.path)
        repo = _column(row, cols.repo)
        language = normalize_language(_column(row, cols.language)) or (language_of(path) if path else None)
        size = _column(row, cols.size)
        metadata = {
            "repo": repo,
            "path": path,
            "language": language,
            "size_bytes": int(size) if isinstance(size, int | float) else len(text.encode("utf-8", "replace")),
            "license": _license(_column(row, cols.license)),
        }
        doc_id = f"{repo}/{path}" if repo and path else f"{source_file}/{id_in_file}"
        return {"text": text, "id": doc_id, "metadata": metadata}


def _column(row: dict[str, Any], name: str | None) -> Any:
    return row.get(name) if name else None


def _license(value: Any) -> str | list[str] | None:
    """Lowercase SPDX id(s): github-code has one string, The Stack a list of the repo's licenses."""
    if isinstance(value, str):
        return value.strip().lower() or None
    if isinstance(value, list | tuple) or hasattr(value, "tolist"):
        items = [str(v).strip().lower() for v in (value.tolist() if hasattr(value, "tolist") else value) if v]
        return items[0] if len(items) == 1 else (items or None)
    return None


class LanguageAllowlist(PipelineStep):
    """Keeps documents whose language is in the spec's allowlist (local sources apply it when listing)."""

    name = "language"
    type = "🔻 - FILTER"

    def __init__(self, languages: list[str]) -> None:
        super().__init__()
        self.languages = frozenset(normalize_language(name) for name in languages)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("total")
            if doc.metadata.get("language") in self.languages:
                self.stat_update("forwarded")
                yield doc
            else:
                self.stat_update("dropped", "dropped_language_not_allowed")


class TakeFirst(PipelineStep):
    """`source.limit` for dataset sources: a per-run cap split evenly over tasks (task r takes its share).

    A task whose shard holds fewer documents than its share does not pass the rest on, so the run reads at
    most `limit` documents. Readers are lazy generators: stopping here stops the reader too.
    """

    name = "limit"
    type = "✂️ - LIMIT"

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        share = self.limit // world_size + (1 if rank < self.limit % world_size else 0)
        if share == 0:
            return
        for taken, doc in enumerate(data, 1):
            self.stat_update("forwarded")
            yield doc
            if taken >= share:
                return


def dataset_reader(source: HuggingFaceSource | FileShardSource, paths_file: Path) -> BaseReader:
    """The datatrove reader for a dataset source; shard sources list their files into `paths_file` first."""
    adapter = CodeColumns(source.columns)
    if isinstance(source, HuggingFaceSource):
        options: dict[str, Any] = {"split": source.split}
        if source.subset:  # The Stack's language dirs (`data/python`) are data_dir; configs are names
            options["data_dir" if "/" in source.subset else "name"] = source.subset
        if source.revision:
            options["revision"] = source.revision
        return HuggingFaceDatasetReader(
            source.dataset, dataset_options=options, streaming=source.streaming, adapter=adapter, text_key="text"
        )
    files = expand_shards(source)
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    atomic_write_text(paths_file, "".join(os.path.relpath(f, root) + "\n" for f in files))
    reader_cls = JsonlReader if source.kind == "jsonl" else ParquetReader
    return reader_cls(root, paths_file=str(paths_file), adapter=adapter)


SHARD_SUFFIXES = {"jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz"), "parquet": (".parquet",)}


def expand_shards(source: FileShardSource) -> list[str]:
    """Files named by the spec (files, directories, globs), sorted; a path matching nothing is a SpecError."""
    suffixes = SHARD_SUFFIXES[source.kind]
    files: list[str] = []
    for raw in source.paths:
        if any(ch in raw for ch in "*?["):
            found = sorted(p for p in glob.glob(raw, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(raw):
            found = sorted(str(p) for p in Path(raw).rglob("*") if p.is_file() and p.name.endswith(suffixes))
        elif os.path.isfile(raw):
            found = [raw]
        else:
            raise SpecError(f"source.paths: {raw} does not exist")
        if not found:
            raise SpecError(f"source.paths: {raw} matches no {source.kind} files ({', '.join(suffixes)})")
        files.extend(os.path.abspath(f) for f in found)
    return files
