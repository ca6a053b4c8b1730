"""Gate CI on benchmark *ratios* and quality floors, never on absolute times.

    python -m benchmarks.compare RESULTS.json... [--baseline benchmarks/baseline.json]
    python -m benchmarks.compare RESULTS.json... --update   # re-record the baseline values (keeps tolerances)

RESULTS.json is what `pytest benchmarks --benchmark-json=RESULTS.json` writes; several (suites run as separate
pytest processes, as `make bench` does) are read as one. Every benchmark puts its
side-by-side ratio (ours vs a baseline measured in the same run, on the same machine, under the same load)
into `extra_info`; machines differ in speed, ratios much less. The baseline file names, per benchmark, the
ratio keys to gate with their recorded value and tolerance (fail when value < recorded * (1 - tolerance)),
quality floors (fail when value < floor) and ceilings for figures that must stay low, such as memory growth
(fail when value > ceiling). Absolute times are printed for the log only. A gated
benchmark missing from the results fails too: a suite that silently stopped running is a regression.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).with_name("baseline.json")


@dataclass(frozen=True)
class Check:
    benchmark: str
    key: str
    kind: str  # "ratio" | "floor" | "ceiling"
    value: float | None
    limit: float
    ok: bool
    recorded: float


def lookup(extra: dict[str, Any], dotted: str) -> float | None:
    """`extra_info` value at a dotted key (`speedup_vs_trl.median_step_tokens_per_s`), or None."""
    node: Any = extra
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) and not isinstance(node, bool) else None


def index_results(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Benchmarks by their short name `file.py::test` (pytest-benchmark's fullname minus the directory)."""
    return {b["fullname"].rsplit("/", 1)[-1]: b for b in results.get("benchmarks", [])}


def evaluate(results: dict[str, Any], baseline: dict[str, Any]) -> list[Check]:
    found = index_results(results)
    checks = []
    for name, gates in baseline["benchmarks"].items():
        extra = found.get(name, {}).get("extra_info", {})
        for key, gate in gates.get("ratios", {}).items():
            value = lookup(extra, key)
            limit = gate["value"] * (1 - gate["tolerance"])
            checks.append(Check(name, key, "ratio", value, limit, value is not None and value >= limit, gate["value"]))
        for key, gate in gates.get("floors", {}).items():
            value = lookup(extra, key)
            ok = value is not None and value >= gate["floor"]
            checks.append(Check(name, key, "floor", value, gate["floor"], ok, gate.get("value", gate["floor"])))
        for key, gate in gates.get("ceilings", {}).items():
            value = lookup(extra, key)
            ok = value is not None and value <= gate["ceiling"]
            checks.append(Check(name, key, "ceiling", value, gate["ceiling"], ok, gate.get("value", gate["ceiling"])))
    return checks


def report(results: dict[str, Any], checks: list[Check]) -> str:
    lines = [f"{'benchmark':<52} {'gate':<44} {'now':>8} {'recorded':>8} {'limit':>8}  verdict"]
    for c in checks:
        now = "missing" if c.value is None else f"{c.value:.3f}"
        verdict = "ok" if c.ok else "REGRESSED"
        gate = f"{c.kind} {c.key}"
        lines.append(f"{c.benchmark:<52} {gate:<44} {now:>8} {c.recorded:>8.3f} {c.limit:>8.3f}  {verdict}")
    lines.append("absolute times (informational, never gated):")
    for name, bench in sorted(index_results(results).items()):
        lines.append(f"  {name:<60} {bench['stats']['mean']:9.1f} s")
    return "\n".join(lines)


def update(results: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The baseline with every gated value re-recorded from `results` (tolerances and floors kept)."""
    found = index_results(results)
    for name, gates in baseline["benchmarks"].items():
        if name not in found:
            raise SystemExit(f"compare --update: {name} is not in the results; run the whole suite first")
        extra = found[name]["extra_info"]
        for section in ("ratios", "floors", "ceilings"):
            for key, gate in gates.get(section, {}).items():
                value = lookup(extra, key)
                if value is None:
                    raise SystemExit(f"compare --update: {name} has no extra_info `{key}`")
                gate["value"] = round(value, 4)
    return baseline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--update", action="store_true", help="re-record the baseline values from RESULTS")
    args = parser.parse_args(argv)
    for path in (*args.results, args.baseline):
        if not path.is_file():
            print(f"compare: {path} does not exist", file=sys.stderr)
            return 2
    results = {"benchmarks": [b for path in args.results for b in json.loads(path.read_text())["benchmarks"]]}
    baseline = json.loads(args.baseline.read_text())
    if args.update:
        tmp = args.baseline.with_suffix(".tmp")
        tmp.write_text(json.dumps(update(results, baseline), indent=2) + "\n")
        tmp.replace(args.baseline)
        print(f"compare: baseline re-recorded in {args.baseline}")
        return 0
    checks = evaluate(results, baseline)
    print(report(results, checks))
    failed = [c for c in checks if not c.ok]
    for c in failed:
        sign = ">" if c.kind == "ceiling" else "<"
        why = "is missing" if c.value is None else f"= {c.value:.3f} {sign} {c.limit:.3f}"
        print(f"compare: {c.benchmark} {c.kind} {c.key} {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
