"""Readers: git HEAD trees, license detection, and the dataset layouts (The Stack, github-code).

The Hugging Face reader cannot reach the hub here, so it is pointed at a local parquet dataset with
The Stack's columns: the same datatrove reader and column mapping as for `bigcode/the-stack-dedup`.
"""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.curate.listing import build_listing, detect_license
from pipelines.curate.readers import CodeFileReader, dataset_reader
from pipelines.languages import KNOWN_LANGUAGES, language_of, normalize_language, stdlib_dir
from sdk.errors import RunError, SpecError
from tests.curate_utils import make_spec, read_shards, run_curate, stats_rows
from tests.logs import logged

THE_STACK_COLUMNS = {
    "text": "content",
    "path": "max_stars_repo_path",
    "repo": "max_stars_repo_name",
    "language": "lang",
    "license": "max_stars_repo_licenses",
    "size": "size",
}
BISECT = (stdlib_dir() / "bisect.py").read_text()
COLORSYS = (stdlib_dir() / "colorsys.py").read_text()
PY_FILES = ["bisect.py", "colorsys.py", "heapq.py", "glob.py", "fnmatch.py", "sched.py"]


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)  # fmt: skip


def read_listing(tmp_path: Path, source: dict) -> tuple[dict, list]:
    spec = make_spec(tmp_path, source)
    listing = tmp_path / "listing.jsonl"
    summary = build_listing(spec.source, listing)
    return summary, list(CodeFileReader(listing).run(rank=0, world_size=1))


def test_git_repo_reads_tracked_files_of_head(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "bisect.py").write_text(BISECT)
    (repo / "colorsys.py").write_text(COLORSYS)
    (repo / "link.py").symlink_to("colorsys.py")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    (repo / "colorsys.py").write_text("# edited after the commit\n")  # HEAD content must win
    (repo / "untracked.py").write_text("print('not committed')\n")

    summary, docs = read_listing(tmp_path, {"paths": [str(repo)]})
    assert summary["skipped"] == {"symlink": 1}
    by_path = {d.metadata["path"]: d for d in docs}
    assert set(by_path) == {"colorsys.py", "pkg/bisect.py"}
    assert by_path["colorsys.py"].text == COLORSYS
    assert by_path["pkg/bisect.py"].metadata == {
        "repo": "repo", "path": "pkg/bisect.py", "language": "python", "size_bytes": len(BISECT), "license": None,
    }  # fmt: skip

    _, work_tree = read_listing(tmp_path, {"paths": [str(repo)], "git": "never"})
    assert {d.metadata["path"] for d in work_tree} == {"colorsys.py", "pkg/bisect.py", "untracked.py"}


def test_git_always_on_a_plain_directory_is_a_spec_error(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.py").write_text(BISECT)
    with pytest.raises(SpecError, match="is not a git work tree"):
        read_listing(tmp_path, {"paths": [str(tmp_path / "plain")], "git": "always"})


def test_license_file_is_detected_and_filtered(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge, to any person ...\n")
    (tree / "bisect.py").write_text(BISECT)
    assert detect_license(tree) == "mit"
    _, docs = read_listing(tmp_path, {"paths": [str(tree)]})
    assert docs[0].metadata["license"] == "mit"

    spec = make_spec(tmp_path, {"paths": [str(tree)]}, filters={"license": {"enabled": True, "allow": ["apache-2.0"]}})
    with (
        logged() as lines,
        pytest.raises(SpecError, match=r"filters: all 1 documents were dropped \(.*license: license_not_allowed 1\)"),
    ):
        run_curate(spec, tmp_path / "run")  # a curate that kept nothing is an error, not a "done" stage
    assert any("every file was dropped" in line for line in lines)
    assert stats_rows(tmp_path / "run")["license"]["dropped"] == {"license_not_allowed": 1}
    assert read_shards(tmp_path / "run" / "curate" / "output") == []


def test_stdlib_carries_its_license(tmp_path: Path) -> None:
    summary, docs = read_listing(tmp_path, {"paths": ["stdlib"], "languages": ["Python"], "limit": 3})
    assert summary["files"] == 3
    assert all(d.metadata["license"] == "psf-2.0" and d.metadata["repo"].endswith("-stdlib") for d in docs)


def test_huggingface_reader_maps_the_stack_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "stack" / "data").mkdir(parents=True)
    table = pa.table({
        "content": [BISECT, "const x = 1;\n"],
        "max_stars_repo_path": ["src/bisect.py", "web/x.js"],
        "max_stars_repo_name": ["org/algo", "org/web"],
        "lang": ["Python", "JavaScript"],
        "max_stars_repo_licenses": [["MIT"], ["Apache-2.0", "MIT"]],
        "size": [len(BISECT), 13],
        "hexsha": ["a1", "b2"],  # other columns are dropped
    })  # fmt: skip
    pq.write_table(table, tmp_path / "stack" / "data" / "train-00000-of-00001.parquet")
    spec = make_spec(
        tmp_path, {"kind": "huggingface", "dataset": str(tmp_path / "stack"), "columns": THE_STACK_COLUMNS}
    )
    docs = list(dataset_reader(spec.source, tmp_path / "unused.txt").run(rank=0, world_size=1))
    assert [d.id for d in docs] == ["org/algo/src/bisect.py", "org/web/web/x.js"]
    assert docs[0].text == BISECT
    meta = {k: v for k, v in docs[1].metadata.items() if k != "dataset"}
    assert meta == {
        "repo": "org/web", "path": "web/x.js", "language": "javascript", "size_bytes": 13,
        "license": ["apache-2.0", "mit"],
    }  # fmt: skip


def _github_code_rows() -> list[dict]:
    rows = []
    for i, name in enumerate(PY_FILES):
        code = (stdlib_dir() / name).read_text()
        rows.append({"code": code, "repo_name": f"org/r{i}", "path": f"lib/{name}", "language": "Python",
                     "license": "mit", "size": len(code.encode())})  # fmt: skip
    rows.append({"code": "# Title\n\nSome prose.\n" * 5, "repo_name": "org/docs", "path": "README.md",
                 "language": "Markdown", "license": "mit", "size": 60})  # fmt: skip
    rows.append(dict(rows[0], repo_name="org/fork"))  # an exact copy in a fork
    return rows


def test_jsonl_shards_through_the_stage(tmp_path: Path) -> None:
    rows = _github_code_rows()
    shards = tmp_path / "shards"
    shards.mkdir()
    for n, part in enumerate((rows[:4], rows[4:])):
        with gzip.open(shards / f"part-{n}.jsonl.gz", "wt") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in part)
    spec = make_spec(
        tmp_path,
        {"kind": "jsonl", "paths": [str(shards)], "languages": ["python"], "columns": {"text": "code"}},
        executor={"kind": "local", "tasks": 2, "workers": 1},
    )
    run_curate(spec, tmp_path / "run")
    out = read_shards(tmp_path / "run" / "curate" / "output")
    assert sorted(d["metadata"]["path"] for d in out) == sorted(f"lib/{n}" for n in PY_FILES)
    assert all(d["metadata"]["language"] == "python" and d["metadata"]["license"] == "mit" for d in out)
    rows_by_step = stats_rows(tmp_path / "run")
    assert rows_by_step["read"]["out"] == 8
    assert rows_by_step["language"]["dropped"] == {"language_not_allowed": 1}
    assert rows_by_step["exact_dedup"]["dropped"] == {"duplicate": 1}


def test_parquet_limit_is_per_run_not_per_task(tmp_path: Path) -> None:
    rows = _github_code_rows()
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "code-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "code-1.parquet")
    spec = make_spec(
        tmp_path,
        {"kind": "parquet", "paths": [str(tmp_path / "*.parquet")], "limit": 3, "columns": {"text": "code"}},
        executor={"kind": "local", "tasks": 2, "workers": 1},
        dedup={"minhash": {"enabled": False}},
    )
    run_curate(spec, tmp_path / "run")
    assert stats_rows(tmp_path / "run")["read"]["in"] == 3  # 2 + 1 over two tasks: reading stops at the share
    assert len(read_shards(tmp_path / "run" / "curate" / "output")) == 3


@pytest.mark.parametrize(
    ("paths", "message"),
    [(["missing_dir"], "missing_dir does not exist"), (["*.nothing"], r"\*.nothing matches no jsonl files")],
)
def test_shard_paths_that_match_nothing_are_spec_errors(tmp_path: Path, paths: list[str], message: str) -> None:
    spec = make_spec(tmp_path, {"kind": "jsonl", "paths": paths})
    with pytest.raises(SpecError, match=message):
        run_curate(spec, tmp_path / "run")


def test_a_source_that_yields_no_document_is_an_error_not_a_done_stage(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    spec = make_spec(
        tmp_path,
        {"kind": "jsonl", "paths": [str(tmp_path / "empty.jsonl")]},
        dedup={"exact": {"enabled": False}, "minhash": {"enabled": False}},
    )
    with pytest.raises(SpecError, match=r"source: the corpus is empty \(no documents read from .*empty.jsonl\)"):
        run_curate(spec, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "curate" / "_stage.json").read_text())["status"] == "running"


def test_a_corrupt_shard_fails_with_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip data" * 10)
    spec = make_spec(tmp_path, {"kind": "jsonl", "paths": [str(tmp_path / "bad.jsonl.gz")]})
    with pytest.raises(RunError, match=r"curate step `filter` failed: .*task logs in .*00_filter/logs"):
        run_curate(spec, tmp_path / "run")


def test_extension_table_covers_the_top_github_languages() -> None:
    # GitHub Octoverse's most used languages (HCL, Dockerfile aside: not files with a code extension)
    top = ["javascript", "python", "typescript", "java", "c#", "c++", "php", "shell", "c", "go", "ruby", "rust",
           "kotlin", "swift", "dart", "scala", "lua", "powershell", "objective-c", "r", "perl", "haskell", "html",
           "css", "sql", "vue", "hcl"]  # fmt: skip
    assert set(top) <= KNOWN_LANGUAGES
    assert language_of("src/Main.KT") == "kotlin" and language_of("x.tsx") == "typescript"
    assert normalize_language("C#") == "c#" and normalize_language("Batchfile") == "shell"


def test_huggingface_source_through_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming HF reader, 2 tasks, The Stack columns, language allowlist and a per-run limit."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = _github_code_rows()
    stack = [{"content": r["code"], "max_stars_repo_path": r["path"], "max_stars_repo_name": r["repo_name"],
              "lang": r["language"], "max_stars_repo_licenses": [r["license"].upper()], "size": r["size"]}
             for r in rows]  # fmt: skip
    (tmp_path / "stack").mkdir()
    pq.write_table(pa.Table.from_pylist(stack), tmp_path / "stack" / "train.parquet")
    source = {"kind": "huggingface", "dataset": str(tmp_path / "stack"), "columns": THE_STACK_COLUMNS,
              "languages": ["python"], "limit": 7}  # fmt: skip
    spec = make_spec(tmp_path, source, executor={"kind": "local", "tasks": 2, "workers": 1})
    run_curate(spec, tmp_path / "run")
    by_step = stats_rows(tmp_path / "run")
    assert by_step["read"]["in"] == 7  # rows 0-6 of 8: the fork's copy (row 7) is past the limit
    assert by_step["language"]["dropped"] == {"language_not_allowed": 1}
    out = read_shards(tmp_path / "run" / "curate" / "output")
    assert sorted(d["metadata"]["path"] for d in out) == sorted(f"lib/{n}" for n in PY_FILES)
    assert all(d["metadata"]["license"] == "mit" for d in out)
