"""The balancing writer: quotas, length-bias rebalancing, shard sizes, determinism, split stability, atomicity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.pairs import PairsStage, writer
from pipelines.pairs.balance import apply_language_quotas, is_heldout, length_bias, rebalance_length
from sdk.errors import RunError
from tests.pairs_helpers import layout, make_spec, pool, write_generate


def keys(n: int, longer: int, language: str = "python", prefix: str = "p") -> list[dict[str, Any]]:
    """Balancing keys: the first `longer` have chosen longer, the rest shorter or tied."""
    return [
        {
            "id": f"{prefix}{i}",
            "language": language,
            "chosen_tokens": 100 if i < longer else 50 + i % 2 * 50,  # odd i >= longer: a tie
            "rejected_tokens": 80 if i < longer else 100,
        }
        for i in range(n)
    ]


def run_stage(root: Path, **pairs: Any) -> dict[str, Any]:
    return PairsStage(make_spec(**pairs), layout(root)).run()


def read_split(outdir: Path, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(outdir.glob(f"{split}-*.parquet"))])


# --------------------------------------------------------------------------- language quotas


def test_quota_caps_a_language_share_and_leaves_others_alone() -> None:
    rows = keys(80, 40, "python") + keys(20, 10, "java", prefix="j")
    kept, dropped = apply_language_quotas(rows, {"python": 0.5}, seed=0)
    langs = [row["language"] for row in kept]
    assert langs.count("java") == 20
    assert langs.count("python") == 20  # the largest count whose share of the total is <= 0.5
    assert len(dropped) == 60 and {row["language"] for row in dropped} == {"python"}


def test_quotas_on_several_languages_reach_a_fixed_point() -> None:
    rows = keys(100, 50, "python") + keys(30, 10, "java", prefix="j") + keys(10, 5, "go", prefix="g")
    quotas = {"python": 0.6, "java": 0.25}
    kept, _ = apply_language_quotas(rows, quotas, seed=0)
    for lang, share in quotas.items():
        assert sum(row["language"] == lang for row in kept) / len(kept) <= share
    assert sum(row["language"] == "go" for row in kept) == 10


def test_quota_choice_is_deterministic_and_seeded() -> None:
    rows = keys(50, 25) + keys(50, 25, "java", prefix="j")
    first = apply_language_quotas(rows, {"python": 0.3}, seed=1)[0]
    assert [r["id"] for r in first] == [r["id"] for r in apply_language_quotas(rows, {"python": 0.3}, seed=1)[0]]
    other = apply_language_quotas(rows, {"python": 0.3}, seed=2)[0]
    assert {r["id"] for r in first} != {r["id"] for r in other}


def test_quotas_that_no_subset_can_meet_are_an_error() -> None:
    with pytest.raises(RunError, match=r"language_quotas caps every language present \(python=0.5\)"):
        apply_language_quotas(keys(10, 5), {"python": 0.5}, seed=0)


# --------------------------------------------------------------------------- length bias


@pytest.mark.parametrize(("n", "longer"), [(200, 180), (200, 20), (101, 77), (57, 3)])
@pytest.mark.parametrize(("target", "tolerance"), [(0.5, 0.1), (0.5, 0.02), (0.3, 0.05)])
def test_rebalancing_lands_in_the_band_and_keeps_as_many_pairs_as_possible(
    n: int, longer: int, target: float, tolerance: float
) -> None:
    rows = keys(n, longer)
    kept, cut = rebalance_length(rows, target, tolerance, seed=0)
    after = length_bias(kept)
    assert after is not None and target - tolerance - 1e-9 <= after <= target + tolerance + 1e-9
    assert len(kept) + len(cut) == n
    # Only the over-represented side is cut, and one pair fewer cut would leave the band.
    cut_longer = {r["chosen_tokens"] > r["rejected_tokens"] for r in cut}
    assert len(cut_longer) <= 1
    if cut:
        assert not target - tolerance <= length_bias([*kept, cut[0]]) <= target + tolerance


def test_rebalancing_leaves_an_in_band_set_and_a_null_target_alone() -> None:
    rows = keys(100, 55)
    assert rebalance_length(rows, 0.5, 0.1, seed=0) == (rows, [])
    assert rebalance_length(keys(100, 95), None, 0.1, seed=0)[1] == []


def test_ties_count_as_not_longer() -> None:
    rows = [
        {"id": "a", "chosen_tokens": 5, "rejected_tokens": 5},
        {"id": "b", "chosen_tokens": 6, "rejected_tokens": 5},
    ]
    assert length_bias(rows) == 0.5
    assert length_bias([]) is None


def test_stage_reports_length_bias_before_and_after(tmp_path: Path) -> None:
    write_generate(tmp_path, pool(120, longer_share=0.9))
    summary = run_stage(tmp_path, balance={"length_bias_target": 0.5, "length_bias_tolerance": 0.05})
    assert summary["length_bias_before"] == pytest.approx(0.9)
    assert 0.45 <= summary["length_bias_after"] <= 0.55
    table = pa.concat_tables([read_split(tmp_path / "pairs", s) for s in ("train", "heldout")])
    written = pc.sum(pc.greater(table["chosen_tokens"], table["rejected_tokens"])).as_py() / len(table)
    assert written == pytest.approx(summary["length_bias_after"], abs=1e-4)


# --------------------------------------------------------------------------- shards


def test_fixed_size_shards_and_an_empty_split_still_gets_a_shard(tmp_path: Path) -> None:
    source = pa.Table.from_pylist([_row(i) for i in range(130)], schema=writer.SCHEMA)
    shards = writer.write_split(source, list(range(130)), tmp_path, "train", 50, "zstd")
    assert shards == [
        {"file": "train-00000.parquet", "rows": 50},
        {"file": "train-00001.parquet", "rows": 50},
        {"file": "train-00002.parquet", "rows": 30},
    ]
    assert [pq.read_metadata(tmp_path / s["file"]).num_rows for s in shards] == [50, 50, 30]
    assert writer.write_split(source, [], tmp_path, "heldout", 50, "none") == [
        {"file": "heldout-00000.parquet", "rows": 0}
    ]
    assert pq.read_table(tmp_path / "heldout-00000.parquet").schema.equals(writer.SCHEMA)


def test_stage_shards_hold_rows_per_shard_rows(tmp_path: Path) -> None:
    write_generate(tmp_path, pool(95), files=3)
    run_stage(tmp_path, balance={"length_bias_target": None}, shards={"rows_per_shard": 20, "heldout_fraction": 0.1})
    outdir = tmp_path / "pairs"
    sizes = {p.name: pq.read_metadata(p).num_rows for p in sorted(outdir.glob("*.parquet"))}
    train = [n for name, n in sizes.items() if name.startswith("train-")]
    heldout = [n for name, n in sizes.items() if name.startswith("heldout-")]
    assert all(n == 20 for n in train[:-1]) and 0 < train[-1] <= 20
    assert sum(train) + sum(heldout) == 95 and sum(heldout) > 0


def _row(i: int) -> dict[str, Any]:
    return {
        "prompt": f"p{i}",
        "chosen": f"c{i}",
        "rejected": f"r{i}",
        "id": f"x{i}",
        "language": "python",
        "chosen_tokens": i,
        "rejected_tokens": 1,
        "chosen_finish": "stop",
        "rejected_finish": "stop",
        "chosen_parses": True,
        "rejected_parses": None,
        "repo": None,
        "path": "a.py",
        "strong_model": "s",
        "weak_model": "w",
    }


# --------------------------------------------------------------------------- determinism and the split


def test_same_seed_same_bytes_other_seed_other_order(tmp_path: Path) -> None:
    records = pool(80, longer_share=0.7)
    for name, files in (("a", 1), ("b", 4)):  # same records spread differently over the input files
        write_generate(tmp_path / name, records, files=files)
        run_stage(tmp_path / name, shards={"rows_per_shard": 16, "heldout_fraction": 0.2})
    files_a = sorted(p.name for p in (tmp_path / "a" / "pairs").glob("*.parquet"))
    assert files_a == sorted(p.name for p in (tmp_path / "b" / "pairs").glob("*.parquet"))
    for name in files_a:
        assert (tmp_path / "a" / "pairs" / name).read_bytes() == (tmp_path / "b" / "pairs" / name).read_bytes()

    write_generate(tmp_path / "c", records)
    run_stage(tmp_path / "c", balance={"seed": 7}, shards={"rows_per_shard": 16, "heldout_fraction": 0.2})
    order_a = read_split(tmp_path / "a" / "pairs", "train")["id"].to_pylist()
    order_c = read_split(tmp_path / "c" / "pairs", "train")["id"].to_pylist()
    assert order_a != order_c


def test_heldout_split_is_stable_when_pairs_are_added(tmp_path: Path) -> None:
    shards = {"rows_per_shard": 1000, "heldout_fraction": 0.25}
    write_generate(tmp_path / "small", pool(120))
    write_generate(tmp_path / "big", pool(120) + pool(200, prefix="more"))
    for name in ("small", "big"):
        run_stage(tmp_path / name, balance={"length_bias_target": None}, shards=shards)
    small = {s: set(read_split(tmp_path / "small" / "pairs", s)["id"].to_pylist()) for s in ("train", "heldout")}
    big = {s: set(read_split(tmp_path / "big" / "pairs", s)["id"].to_pylist()) for s in ("train", "heldout")}
    assert small["heldout"] <= big["heldout"] and small["train"] <= big["train"]
    assert 0.15 < len(big["heldout"]) / 320 < 0.35
    assert all(is_heldout(pair_id, 0.25) for pair_id in big["heldout"])


# --------------------------------------------------------------------------- atomicity and rerun safety


def test_crash_mid_write_leaves_only_complete_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_generate(tmp_path, pool(60))
    real_write = pq.write_table
    calls = []

    def crash_after_first(table: pa.Table, where: str, **kwargs: Any) -> None:
        calls.append(where)
        if len(calls) == 1:
            return real_write(table, where, **kwargs)
        Path(where).write_bytes(b"PAR1 half a shard")  # the partial file a crash leaves behind
        raise OSError("disk full")

    monkeypatch.setattr(writer.pq, "write_table", crash_after_first)
    spec = {"balance": {"length_bias_target": None}, "shards": {"rows_per_shard": 20, "heldout_fraction": 0}}
    with pytest.raises(OSError, match="disk full"):
        run_stage(tmp_path, **spec)
    outdir = tmp_path / "pairs"
    assert sorted(p.name for p in outdir.iterdir() if p.is_file()) == ["train-00000.parquet"]  # and checked/, logs/
    assert pq.read_table(outdir / "train-00000.parquet").num_rows == 20

    monkeypatch.setattr(writer.pq, "write_table", real_write)
    summary = run_stage(tmp_path, **spec)
    assert summary["train"] == 60
    names = sorted(p.name for p in outdir.iterdir() if p.is_file())
    assert names == ["README.md", "manifest.json", "train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]


def test_rerun_replaces_stale_outputs_of_an_earlier_attempt(tmp_path: Path) -> None:
    outdir = tmp_path / "pairs"
    outdir.mkdir()
    (outdir / "train-00041.parquet").write_bytes(b"old")
    (outdir / "heldout-00003.parquet").write_bytes(b"old")
    (outdir / ".train-00000.parquet.abc.tmp").write_bytes(b"partial")
    (outdir / "_stage.json").write_text("{}")  # the runner's record is not the stage's to remove
    write_generate(tmp_path, pool(30))
    run_stage(tmp_path, balance={"length_bias_target": None}, shards={"heldout_fraction": 0})
    assert sorted(p.name for p in outdir.iterdir() if p.is_file()) == [
        "README.md",
        "_stage.json",
        "manifest.json",
        "train-00000.parquet",
    ]
