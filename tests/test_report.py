"""WORKDIR/report.md from a synthetic workdir holding what each stage leaves on disk.

Checks: every section whose inputs exist is there, every linked image exists and is a PNG, missing or
unreadable stage outputs cost their section only, and the determinism hash follows the pairs' content.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.report import funnel_steps, pairs_digest, stage_records, write_report
from pipelines.spec import load_spec
from pipelines.stage import RunLayout
from sdk.fileio import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def spec():
    return load_spec(REPO / "specs" / "ci_small.yaml")


def record(root: Path, stage: str, seconds: float, **summary: Any) -> None:
    atomic_write_json(root / stage / "_stage.json", {"stage": stage, "status": "done", "seconds": seconds,
                                                      "fingerprint": "f", "summary": summary})  # fmt: skip


def pair_rows(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {"prompt": f"Write f{i} ({tag}).", "chosen": f"def f{i}():\n    return {i}\n" * 40, "rejected": "pass",
         "id": f"{tag}-{i}", "language": "python", "chosen_tokens": 30 + 7 * i, "rejected_tokens": 60 - 3 * i}
        for i in range(n)
    ]  # fmt: skip


def metrics(root: Path, stage: str, steps: int, lm: bool) -> None:
    rows = [{"step": s, "loss": 1.0 / s, "ranking": 0.7 / s, "lm": 0.3 / s if lm else 0.0, "accuracy": s / steps,
             "lr": 1e-5} for s in range(1, steps + 1)]  # fmt: skip
    (root / stage).mkdir(parents=True, exist_ok=True)
    (root / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def full_workdir(root: Path) -> Path:
    """Everything a finished run leaves, with the shapes the stages write."""
    record(root, "curate", 3.0, documents_in=300, documents_out=64, output="curate/output/*.jsonl.gz")
    atomic_write_json(root / "curate" / "stats.json", {"documents_in": 300, "documents_out": 64, "steps": [
        {"step": "list", "in": 316, "out": 300, "dropped": {"not_code": 15, "language_not_allowed": 1}},
        {"step": "read", "in": 300, "out": 83, "dropped": {"too_large": 217}},
        {"step": "size", "in": 83, "out": 66, "dropped": {"too_small": 17}},
        {"step": "exact_dedup", "in": 66, "out": 64, "dropped": {"duplicate": 2}},
    ]})  # fmt: skip
    record(root, "describe", 155.9, documents_in=64, instructions_out=61, dropped_too_short=3)
    record(root, "generate", 185.1, instructions_in=61, records_out=61)
    record(root, "pairs", 0.3, candidates=61, pairs=12, train=9, heldout=3)
    atomic_write_json(root / "pairs" / "manifest.json", {
        "stages": {"pairs": {"in_candidates": 61, "passed_checks": 38, "out": 12, "out_train": 9, "out_heldout": 3}},
        "drops": {"truncated": {"count": 23, "sample_ids": []}, "empty": {"count": 0, "sample_ids": []},
                  "length_bias": {"count": 26, "sample_ids": []}},
        "length_bias": {"definition": "share of pairs whose chosen reply has more tokens", "before": 0.13,
                        "after": 0.42, "after_train": 0.44, "after_heldout": 0.33, "target": 0.5, "tolerance": 0.1},
        "parses": {"chosen": 0.42, "rejected": 0.5},
    })  # fmt: skip
    pq.write_table(pa.Table.from_pylist(pair_rows(9, "train")), root / "pairs" / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(pair_rows(3, "heldout")), root / "pairs" / "heldout-00000.parquet")
    record(root, "pretrain", 40.0, pairs=9, steps=5, final_loss=0.2, final_accuracy=1.0, resumed_from=None)
    metrics(root, "pretrain", 5, lm=True)
    record(root, "finetune", 20.0, pairs=8, steps=3, final_loss=0.3, final_accuracy=0.67, resumed_from=2)
    metrics(root, "finetune", 3, lm=False)
    atomic_write_json(root / "finetune" / "data" / "summary.json", {
        "problems": 4, "task_ids": ["HumanEval/160", "HumanEval/163"], "k": 2, "candidates": 12, "pass_rate": 0.0,
        "sampled_statuses": {"failed": 7, "timeout": 1}, "canonical_passed": 4, "pairs": 8,
    })  # fmt: skip
    record(root, "evaluate", 60.0, heldout_accuracy=0.667)
    atomic_write_json(root / "evaluate" / "results.json", {
        "model": str(root / "finetune" / "final"),
        "heldout": {"data": "x", "accuracy": 0.6667, "mean_margin": 0.1, "n": 3,
                    "by_language": {"python": {"accuracy": 0.6667, "mean_margin": 0.1, "n": 3}}},
        "humaneval": {"problems": 4, "k": 4, "sample_pass_rate": 0.125, "curve": {
            "n": [1, 2, 4], "problems": 4, "random": [0.125] * 3, "oracle": [0.125, 0.2, 0.25],
            "rm": {"mean": [0.125, 0.15, 0.25], "std": [0.05, 0.04, 0.0]}}},
    })  # fmt: skip
    (root / "evaluate" / "bon_humaneval.png").write_bytes(tiny_png())
    return root


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG (the evaluate stage's plot stands in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return PNG + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")


def images(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def test_full_report_has_every_section_and_its_plots(spec, tmp_path):
    root = full_workdir(tmp_path / "run")
    path = write_report(spec, RunLayout(root))
    assert path == root / "report.md"
    text = path.read_text()
    for header in ("## Stages", "## Data funnel", "## Preference pairs", "## Reward-model training",
                   "## Finetuning data", "## Evaluation", "## Sample pairs", "## Determinism"):  # fmt: skip
        assert header in text, header
    linked = images(text)
    assert {"report/funnel.png", "report/lengths.png", "report/length_bias.png", "report/pretrain.png",
            "report/finetune.png", "evaluate/bon_humaneval.png"} <= set(linked)  # fmt: skip
    for link in linked:
        assert (root / link).read_bytes().startswith(PNG), link
    assert not [p for p in (root / "report").iterdir() if p.name.startswith(".")]  # no temp files left
    # figures a reader looks for
    assert "| describe | done | 2.6 min |" in text and "| curate | done | 3.0 s |" in text
    assert "| curate: read | 83 | too_large: 217 |" in text
    assert "| pairs: passed checks | 38 | truncated: 23 |" in text  # zero-count reasons left out
    assert "| pairs: written (balanced) | 12 | length_bias: 26 |" in text
    assert "before 0.130, after 0.420" in text
    assert "| heldout | 0.6667 | 3 |" in text and "| heldout: language = python | 0.6667 | 3 |" in text
    assert "Best-of-N on humaneval (4 problems, sample pass rate 0.125)" in text
    assert "| N | rm | random | oracle |" in text and "| 4 | 0.250 ± 0.000 | 0.125 | 0.250 |" in text
    assert "| finetune | 8 | 3 | 0.3333 | 1 | 2 |" in text
    assert "HumanEval/160 .. HumanEval/163" in text and "| sampled_statuses | failed: 7, timeout: 1 |" in text
    assert text.count("** (heldout)") == 3 and "[... " in text  # three held-out samples, long sides truncated
    digests = pairs_digest(root / "pairs")
    assert digests["train"]["rows"] == 9 and digests["train"]["sha256"] in text and digests["heldout"]["sha256"] in text


def test_funnel_runs_from_files_found_to_pairs_written(tmp_path):
    root = full_workdir(tmp_path / "run")
    steps = funnel_steps(root, stage_records(RunLayout(root)))
    assert [(name, kept) for name, kept, _ in steps] == [
        ("files found", 316), ("curate: list", 300), ("curate: read", 83), ("curate: size", 66),
        ("curate: exact_dedup", 64), ("describe: instructions", 61), ("generate: strong + weak replies", 61),
        ("pairs: passed checks", 38), ("pairs: written (balanced)", 12),
    ]  # fmt: skip
    assert steps[5][2] == {"too_short": 3}


def test_missing_stages_are_skipped_and_marked_not_run(spec, tmp_path):
    root = tmp_path / "run"
    record(root, "curate", 3.0, documents_in=10, documents_out=4)
    atomic_write_json(root / "curate" / "stats.json", {"steps": [{"step": "read", "in": 10, "out": 4, "dropped": {}}]})
    text = write_report(spec, RunLayout(root)).read_text()
    assert "| pretrain | not run |  |  |" in text and "| evaluate | not run |  |  |" in text
    for absent in ("## Preference pairs", "## Reward-model training", "## Evaluation", "## Determinism",
                   "## Sample pairs", "left out"):  # fmt: skip
        assert absent not in text, absent
    assert images(text) == ["report/funnel.png"]


def test_unreadable_outputs_cost_their_section_not_the_report(spec, tmp_path):
    root = full_workdir(tmp_path / "run")
    (root / "evaluate" / "results.json").write_text("{not json")
    (root / "evaluate" / "bon_humaneval.png").unlink()
    with (root / "finetune" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # the torn last line of a killed run
    (root / "pairs" / "train-00000.parquet").write_bytes(b"PAR1 torn")
    text = write_report(spec, RunLayout(root)).read_text()
    assert "## Evaluation" not in text
    assert "| finetune | 8 | 3 |" in text  # the whole lines before the torn one
    broken = f"{root / 'pairs' / 'train-00000.parquet'}: not a readable parquet file"
    for title in ("preference pairs", "sample pairs", "determinism"):  # each names the file that failed
        assert f"_(section '{title}' left out: DataError: {broken}" in text, title
    assert "## Data funnel" in text and "## Reward-model training" in text


def test_digest_follows_content_and_order(tmp_path):
    root = full_workdir(tmp_path / "a")
    copy = tmp_path / "b"
    shutil.copytree(root / "pairs", copy / "pairs")
    assert pairs_digest(root / "pairs") == pairs_digest(copy / "pairs")
    rows = pair_rows(9, "train")
    pq.write_table(pa.Table.from_pylist(rows[::-1]), copy / "pairs" / "train-00000.parquet")
    changed = pairs_digest(copy / "pairs")
    assert changed["train"]["sha256"] != pairs_digest(root / "pairs")["train"]["sha256"]
    assert changed["heldout"] == pairs_digest(root / "pairs")["heldout"]
