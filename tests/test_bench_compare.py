"""The CI benchmark gate: ratios regress beyond tolerance -> fail; absolute times never gate."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import compare

BASELINE = {
    "benchmarks": {
        "bench_a.py::test_a": {"ratios": {"speedup.median": {"value": 2.0, "tolerance": 0.25}}},
        "bench_q.py::test_q": {"floors": {"rm_accuracy": {"floor": 0.55, "value": 0.7}}},
    }
}


def results(speedup: float | None, accuracy: float, mean_s: float = 10.0) -> dict:
    extra_a = {} if speedup is None else {"speedup": {"median": speedup}}
    return {
        "benchmarks": [
            {"fullname": "benchmarks/bench_a.py::test_a", "extra_info": extra_a, "stats": {"mean": mean_s}},
            {
                "fullname": "benchmarks/bench_q.py::test_q",
                "extra_info": {"rm_accuracy": accuracy},
                "stats": {"mean": 1.0},
            },
        ]
    }


def run(tmp_path: Path, res: dict, *extra: str) -> int:
    (tmp_path / "r.json").write_text(json.dumps(res))
    (tmp_path / "b.json").write_text(json.dumps(BASELINE))
    return compare.main([str(tmp_path / "r.json"), "--baseline", str(tmp_path / "b.json"), *extra])


def test_within_tolerance_passes_whatever_the_absolute_time(tmp_path: Path) -> None:
    assert run(tmp_path, results(1.6, 0.6, mean_s=1e6)) == 0  # 1.6 >= 2.0 * 0.75


def test_a_ratio_regressed_beyond_tolerance_fails_and_says_which(tmp_path: Path, capsys) -> None:
    assert run(tmp_path, results(1.4, 0.9)) == 1
    assert "bench_a.py::test_a ratio speedup.median = 1.400 < 1.500" in capsys.readouterr().err


def test_a_quality_floor_gates(tmp_path: Path, capsys) -> None:
    assert run(tmp_path, results(3.0, 0.5)) == 1
    assert "rm_accuracy" in capsys.readouterr().err


def test_a_missing_measurement_fails(tmp_path: Path, capsys) -> None:
    assert run(tmp_path, results(None, 0.9)) == 1
    assert "is missing" in capsys.readouterr().err


def test_a_ceiling_fails_above_its_limit_and_passes_at_it(tmp_path: Path, capsys) -> None:
    baseline = {"benchmarks": {"bench_m.py::test_m": {"ceilings": {"rss_ratio": {"ceiling": 1.2, "value": 1.0}}}}}
    (tmp_path / "b.json").write_text(json.dumps(baseline))
    for value, code in ((1.2, 0), (1.35, 1)):
        res = {
            "benchmarks": [
                {"fullname": "b/bench_m.py::test_m", "extra_info": {"rss_ratio": value}, "stats": {"mean": 1}}
            ]
        }
        (tmp_path / "r.json").write_text(json.dumps(res))
        assert compare.main([str(tmp_path / "r.json"), "--baseline", str(tmp_path / "b.json")]) == code
    assert "ceiling rss_ratio = 1.350 > 1.200" in capsys.readouterr().err


def test_results_split_over_several_files_are_read_as_one(tmp_path: Path) -> None:
    """`make bench` runs its suites as separate pytest processes: each gate finds its benchmark in any file, and a
    benchmark in none of them is still missing."""
    (tmp_path / "b.json").write_text(json.dumps(BASELINE))
    first, second = results(1.6, 0.9)["benchmarks"]
    for name, rows in (("1.json", [first]), ("2.json", [second])):
        (tmp_path / name).write_text(json.dumps({"benchmarks": rows}))
    files = [str(tmp_path / "1.json"), str(tmp_path / "2.json")]
    assert compare.main([*files, "--baseline", str(tmp_path / "b.json")]) == 0
    assert compare.main([files[0], "--baseline", str(tmp_path / "b.json")]) == 1  # bench_q's floor is missing


def test_update_records_values_and_keeps_tolerances(tmp_path: Path) -> None:
    assert run(tmp_path, results(3.5, 0.8), "--update") == 0
    new = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    assert new["bench_a.py::test_a"]["ratios"]["speedup.median"] == {"value": 3.5, "tolerance": 0.25}
    assert new["bench_q.py::test_q"]["floors"]["rm_accuracy"] == {"floor": 0.55, "value": 0.8}


def test_the_committed_baseline_gates_every_benchmark_suite() -> None:
    """Each bench_*.py in benchmarks/ has at least one gate: a new suite cannot be forgotten."""
    baseline = json.loads(compare.BASELINE.read_text())["benchmarks"]
    gated_files = {name.split("::")[0] for name in baseline}
    suites = {p.name for p in compare.BASELINE.parent.glob("bench_*.py")}
    assert suites <= gated_files, f"not gated: {sorted(suites - gated_files)}"
    assert all(g.get("ratios") or g.get("floors") or g.get("ceilings") for g in baseline.values())
