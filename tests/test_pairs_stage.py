"""The pairs stage end to end on hand-made generate output: columns, manifest, card, loading, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipelines import runner
from pipelines.pairs import PairsStage
from pipelines.pairs import stage as stage_module
from pipelines.pairs.writer import COLUMNS
from sdk.errors import DataError, RunError
from tests.pairs_helpers import STRONG_REPLY, WEAK_REPLY, layout, make_spec, pool, record, write_generate

LOOP = "```python\ndef f(xs):\n" + "    xs.append(xs[-1])\n" * 10 + "```"
CUT = "```python\ndef merge(a):\n    res = []\n    for x in"


def mixed_records() -> list[dict[str, Any]]:
    """Good pairs plus one pair for each drop reason, and a record with more strong than weak samples."""
    return [
        *pool(24),
        record("empty", [STRONG_REPLY], ["```python\n```"]),
        record("cut", [STRONG_REPLY], [CUT], weak_finish=["length"]),
        record("loop", [LOOP], [WEAK_REPLY]),
        record("same", [STRONG_REPLY], [STRONG_REPLY.replace("Here is", "This is")]),
        record("close", [STRONG_REPLY], [STRONG_REPLY.replace("<= merged", "< merged")]),
        record(
            "multi",
            [STRONG_REPLY, STRONG_REPLY.replace("merged", "result"), STRONG_REPLY],
            [WEAK_REPLY, "I am not sure what you mean."],
            strong_tokens=[90, 91, 92],
            weak_tokens=[60, 8],
        ),
    ]


def run(root: Path, **pairs: Any) -> dict[str, Any]:
    return PairsStage(make_spec(**pairs), layout(root)).run()


def all_rows(outdir: Path) -> list[dict[str, Any]]:
    return [row for path in sorted(outdir.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


NO_BALANCE = {"balance": {"length_bias_target": None}, "shards": {"rows_per_shard": 8, "heldout_fraction": 0.25}}


def test_pairs_carry_the_preference_columns_and_metadata(tmp_path: Path) -> None:
    write_generate(tmp_path, mixed_records(), files=2)
    summary = run(tmp_path, **NO_BALANCE)
    rows = {row["id"]: row for row in all_rows(tmp_path / "pairs")}
    assert summary["pairs"] == len(rows) == 24 + 2  # the pool plus multi-0 and multi-1
    assert list(pq.read_table(next((tmp_path / "pairs").glob("train-*.parquet"))).column_names) == list(COLUMNS)

    first, text_reply = rows["multi-0"], rows["multi-1"]
    assert first["prompt"].startswith("Implement the following") and first["prompt"].endswith("of multi.")
    assert first["chosen"] == STRONG_REPLY and first["rejected"] == WEAK_REPLY
    assert (first["chosen_tokens"], first["rejected_tokens"]) == (90, 60)
    assert (first["chosen_finish"], first["rejected_finish"]) == ("stop", "stop")
    assert (first["chosen_parses"], first["rejected_parses"]) == (True, True)
    assert (first["language"], first["repo"], first["path"]) == ("python", None, "lib/multi.py")
    assert first["strong_model"] == "smollm2-135m-instruct"
    assert first["weak_model"] == "smollm2-135m-instruct[prune 13+13]"
    assert text_reply["rejected_parses"] is False  # prose is not code
    assert "multi-2" not in rows  # strong had a third sample, weak did not


def test_manifest_counts_drops_stats_and_shards(tmp_path: Path) -> None:
    write_generate(tmp_path, mixed_records())
    curate = {"documents_in": 40, "documents_out": 31}
    (tmp_path / "curate").mkdir()
    (tmp_path / "curate" / "_stage.json").write_text(json.dumps({"status": "done", "summary": curate}))
    run(tmp_path, **NO_BALANCE)
    outdir = tmp_path / "pairs"
    manifest = json.loads((outdir / "manifest.json").read_text())

    assert manifest["stages"]["curate"] == curate
    assert "describe" not in manifest["stages"]  # no record, nothing invented
    counts = manifest["stages"]["pairs"]
    assert counts["in_records"] == 30 and counts["in_candidates"] == 31 and counts["unpaired_samples"] == 1
    assert counts["passed_checks"] == counts["out"] == 26 == counts["out_train"] + counts["out_heldout"]

    drops = manifest["drops"]
    expected = {"empty": "empty-0", "truncated": "cut-0", "repetition": "loop-0", "identical": "same-0"}
    expected["near_identical"] = "close-0"
    for reason, pair_id in expected.items():
        assert drops[reason] == {"count": 1, "sample_ids": [pair_id]}, reason
    assert drops["length_bias"]["count"] == drops["language_quota"]["count"] == 0

    stats = manifest["stats"]["chosen_tokens"]
    assert set(stats) == {"mean", "median", "p90", "max"} and stats["median"] <= stats["p90"] <= stats["max"]
    assert manifest["length_bias"]["before"] == manifest["length_bias"]["after"]
    assert manifest["length_bias"]["target"] is None
    listed = {shard["file"]: shard["rows"] for shards in manifest["shards"].values() for shard in shards}
    on_disk = {p.name: pq.read_metadata(p).num_rows for p in outdir.glob("*.parquet")}
    assert listed == on_disk


def test_drop_sample_ids_are_capped_at_five(tmp_path: Path) -> None:
    records = pool(6) + [record(f"e{i}", [STRONG_REPLY], [""]) for i in range(9)]
    write_generate(tmp_path, records)
    run(tmp_path, **NO_BALANCE)
    empty = json.loads((tmp_path / "pairs" / "manifest.json").read_text())["drops"]["empty"]
    assert empty["count"] == 9 and empty["sample_ids"] == [f"e{i}-0" for i in range(5)]


def test_dataset_card_says_what_how_and_how_many(tmp_path: Path) -> None:
    write_generate(tmp_path, mixed_records() + pool(40, longer_share=1.0, prefix="long"))
    run(tmp_path, shards={"rows_per_shard": 8, "heldout_fraction": 0.25})
    card = (tmp_path / "pairs" / "README.md").read_text()
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    bias = manifest["length_bias"]
    assert bias["before"] > 0.6 and 0.4 <= bias["after"] <= 0.6
    assert "path: train-*.parquet" in card and "path: heldout-*.parquet" in card  # Hub front matter
    for column in COLUMNS:
        assert f"| {column} |" in card
    assert f"**{bias['before']}** after the checks, **{bias['after']}** as written" in card
    assert f"| length_bias | {manifest['drops']['length_bias']['count']} |" in card
    assert "| near_identical | 1 |" in card
    assert "smollm2-135m-instruct[prune 13+13]" in card
    assert "licenses of the source code" in card and "follow the source" in card
    assert "Fenced blocks" in card  # the extraction rule is documented


def test_load_dataset_reads_the_shards(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    write_generate(tmp_path, mixed_records())
    summary = run(tmp_path, **NO_BALANCE)
    outdir = tmp_path / "pairs"
    loaded = datasets.load_dataset(
        "parquet",
        data_files={"train": str(outdir / "train-*.parquet"), "heldout": str(outdir / "heldout-*.parquet")},
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert loaded["train"].num_rows == summary["train"] and loaded["heldout"].num_rows == summary["heldout"]
    assert loaded["train"].column_names == list(COLUMNS)
    assert {"prompt", "chosen", "rejected"} <= set(loaded["heldout"][0])
    # The card's front matter names the splits, so the directory alone loads too.
    by_dir = datasets.load_dataset(str(outdir), cache_dir=str(tmp_path / "hf-cache"))
    assert {split: by_dir[split].num_rows for split in by_dir} == {
        "train": summary["train"],
        "heldout": summary["heldout"],
    }


def test_zero_surviving_pairs_is_a_one_line_error_with_the_drop_table(tmp_path: Path) -> None:
    write_generate(
        tmp_path,
        [
            record("a", [""], [WEAK_REPLY]),
            record("b", [STRONG_REPLY], [STRONG_REPLY]),
            record("c", [CUT], [WEAK_REPLY], strong_finish=["length"]),
        ],
    )
    with pytest.raises(RunError) as caught:
        run(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "no pair survived (3 candidates from 3 records)" in message
    assert "empty=1, truncated=1, repetition=0, identical=1, near_identical=0" in message
    assert not list((tmp_path / "pairs").glob("*.parquet")) and not (tmp_path / "pairs" / "manifest.json").exists()


def test_missing_generate_output_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"no generate output in .*generate/output.*run the `generate` stage"):
        run(tmp_path)


def test_malformed_input_names_the_file_and_line(tmp_path: Path) -> None:
    write_generate(tmp_path, pool(2))
    bad = tmp_path / "generate" / "output" / "00001.jsonl.gz"
    good = json.dumps(record("x", [STRONG_REPLY], [WEAK_REPLY]))
    with gzip.open(bad, "wt") as handle:
        handle.write(good + "\n{not json\n")
    with pytest.raises(DataError, match=r"00001\.jsonl\.gz:2: not a JSON object"):
        run(tmp_path)
    with gzip.open(bad, "wt") as handle:
        handle.write(json.dumps({"id": "y", "prompt": "p", "strong": {"samples": []}}) + "\n")
    with pytest.raises(DataError, match=r"00001\.jsonl\.gz:1: record lacks weak"):
        run(tmp_path)
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"00001\.jsonl\.gz: unreadable shard"):
        run(tmp_path)


def test_duplicate_pair_ids_are_written_once(tmp_path: Path) -> None:
    write_generate(tmp_path, pool(5) + pool(2))
    summary = run(tmp_path, **NO_BALANCE)
    assert summary["pairs"] == 5
    assert json.loads((tmp_path / "pairs" / "manifest.json").read_text())["drops"]["duplicate_id"]["count"] == 2


def test_runner_runs_the_stage_and_records_its_summary(tmp_path: Path) -> None:
    spec = make_spec(**NO_BALANCE)
    runner.claim_workdir(tmp_path)
    write_generate(tmp_path, mixed_records())
    for stage in ("curate", "describe", "generate"):
        (tmp_path / stage).mkdir(exist_ok=True)
        runner.record_done(spec, runner.RunLayout(tmp_path), stage, {"out": 30})
    [result] = runner.run_spec(spec, tmp_path, only="pairs")
    assert result["status"] == "done" and result["summary"]["pairs"] == 26
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["stages"]["generate"] == {"out": 30}


# --------------------------------------------------------------------------- pass 1 as datatrove tasks


def _outputs(outdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(outdir.iterdir()) if p.is_file() and p.name != "_stage.json"}


def test_any_task_count_writes_the_same_pairs_manifest_and_card(tmp_path: Path) -> None:
    """Generate shard i is checked by task i mod tasks; the driver merges the shards in name order."""
    written = {}
    for tasks in (1, 3):
        root = tmp_path / f"tasks-{tasks}"
        write_generate(root, mixed_records() + pool(40, prefix="more"), files=5)
        spec = make_spec(**NO_BALANCE, executor={"kind": "local", "tasks": tasks, "workers": 1})
        summary = PairsStage(spec, layout(root)).run()
        completions = root / "pairs" / "logs" / f"{tasks}-tasks" / "completions"
        assert len(list(completions.iterdir())) == tasks
        assert sorted(p.name for p in (root / "pairs" / "checked").glob("*.json")) == [
            f"{i:05d}.json" for i in range(5)
        ]
        written[tasks] = (summary, _outputs(root / "pairs"))
    assert written[1] == written[3]


def test_a_rerun_checks_only_the_shards_not_yet_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_generate(tmp_path, pool(30), files=3)
    first = run(tmp_path, **NO_BALANCE)
    before = _outputs(tmp_path / "pairs")
    # as if killed while checking shard 1: its marker and the task's completion are not there yet
    (tmp_path / "pairs" / "checked" / "00001.json").unlink()
    (tmp_path / "pairs" / "logs" / "1-tasks" / "completions" / "00000").unlink()
    read: list[str] = []
    real = stage_module.read_candidates

    def reading(files: list[Path], stats: Any) -> Any:
        read.extend(f.name for f in files)
        return real(files, stats)

    monkeypatch.setattr(stage_module, "read_candidates", reading)
    assert run(tmp_path, **NO_BALANCE) == first
    assert read == ["00001.jsonl.gz"]
    assert _outputs(tmp_path / "pairs") == before


def test_a_pair_in_two_shards_is_kept_once_as_the_first(tmp_path: Path) -> None:
    records = pool(6)
    write_generate(tmp_path, [*records, records[0]], files=2)  # doc0000 lands in shards 0 and 1
    summary = run(tmp_path, balance={"length_bias_target": None}, shards={"heldout_fraction": 0})
    ids = [row["id"] for row in all_rows(tmp_path / "pairs")]
    assert sorted(ids) == sorted({r["id"] + "-0" for r in records}) and summary["pairs"] == 6
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["drops"]["duplicate_id"] == {"count": 1, "sample_ids": ["doc0000-0"]}
