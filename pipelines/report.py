"""`WORKDIR/report.md`: the human summary of a run, with PNG plots under `WORKDIR/report/`.

Built only from what stages left on disk (their `_stage.json` records and outputs), so it can be written
after any run, complete or not: a section appears only when its inputs exist, and a file that cannot be
read costs its section, never the report. Every file is written to a temp name and renamed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pipelines.spec import Spec
from pipelines.stage import RunLayout, read_record
from pipelines.stages import NAMES, declared_names
from sdk.errors import DataError
from sdk.fileio import atomic_path, atomic_write_text

PLOTS = "report"
SAMPLE_PAIRS = 3
SAMPLE_CHARS = 400
SPLITS = ("train", "heldout")


# --------------------------------------------------------------------------- reading what exists


def _json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a crashed stage may leave either)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a torn last line of a killed run
    return rows


def stage_records(layout: RunLayout) -> dict[str, dict[str, Any]]:
    """`_stage.json` of every stage that has one, in pipeline order."""
    records = {}
    for stage in NAMES:
        record = read_record(layout, stage)
        if record is not None and record.get("status") != "corrupt":
            records[stage] = record
    return records


def split_files(pairs_dir: Path, split: str) -> list[str]:
    return sorted(glob.glob(str(pairs_dir / f"{split}-*.parquet")))


def _read_parquet(file: str, columns: Sequence[str] | None = None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if columns is not None:
            names = pq.read_schema(file).names
            columns = [c for c in columns if c in names]
        return pq.read_table(file, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{file}: not a readable parquet file ({exc})") from exc


def pairs_digest(pairs_dir: Path) -> dict[str, dict[str, Any]]:
    """Per split: sha256 over its rows in order (shards by name, every column as sorted-key JSON) and rows.

    Two runs of the same spec and seeds must give the same digests: this is the determinism claim's check.
    """
    out = {}
    for split in SPLITS:
        files = split_files(pairs_dir, split)
        if not files:
            continue
        digest, rows = hashlib.sha256(), 0
        for file in files:
            for row in _read_parquet(file).to_pylist():
                digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
                rows += 1
        out[split] = {"sha256": digest.hexdigest(), "rows": rows}
    return out


# --------------------------------------------------------------------------- plots


class Plots:
    """Saves matplotlib figures (Agg, no display) atomically under WORKDIR/report/; returns md image links."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / PLOTS
        self._plt: Any = None

    @property
    def plt(self) -> Any:
        if self._plt is None:  # imported on first plot: a report without plots does not pay for matplotlib
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            self._plt = plt
        return self._plt

    def save(self, fig: Any, name: str, alt: str) -> str:
        try:
            fig.tight_layout()
            with atomic_path(self.dir / name) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        finally:
            self.plt.close(fig)
        return f"![{alt}]({PLOTS}/{name})"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else _cell(c) for c in row) + " |" for row in rows]
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


# Figures a reader looks for first in a stage summary (records store keys sorted, which buries them).
HEADLINE = ("documents_in", "documents_out", "instructions_out", "records_out", "pairs", "train", "heldout",
            "steps", "final_loss", "final_accuracy", "resumed_from", "exec_pass_rate", "exec_pairs")  # fmt: skip


def _figures(summary: dict[str, Any], limit: int = 6) -> str:
    """The headline scalar figures of a stage summary, then others, for the stage table (paths left out)."""
    keys = [k for k in HEADLINE if k in summary] + [k for k in summary if k not in HEADLINE]
    items = [
        f"{k}={_cell(summary[k])}"
        for k in keys
        if (isinstance(summary[k], int | float) and not isinstance(summary[k], bool))
        or (isinstance(summary[k], str) and "/" not in summary[k])
    ]
    return ", ".join(items[:limit])


# --------------------------------------------------------------------------- sections


def _stages_section(spec: Spec, records: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for stage in declared_names(spec):
        record = records.get(stage)
        if record is None:
            rows.append((stage, "not run", "", ""))
            continue
        seconds = record.get("seconds")
        wall = _duration(seconds) if isinstance(seconds, int | float) else ""
        rows.append((stage, record.get("status", "?"), wall, _figures(record.get("summary") or {})))
    return ["## Stages", "", *_table(("stage", "status", "wall time", "figures"), rows)]


def funnel_steps(root: Path, records: dict[str, dict[str, Any]]) -> list[tuple[str, int, dict[str, int]]]:
    """(step, documents kept, drops by reason) from the corpus listing to the pairs written."""
    steps: list[tuple[str, int, dict[str, int]]] = []
    curate = _json(root / "curate" / "stats.json")
    if isinstance(curate, dict):
        for row in curate.get("steps") or []:
            if not steps:
                steps.append(("files found", int(row.get("in", 0)), {}))
            steps.append((f"curate: {row.get('step')}", int(row.get("out", 0)), dict(row.get("dropped") or {})))
    described = (records.get("describe") or {}).get("summary") or {}
    if "instructions_out" in described:
        drops = {k.removeprefix("dropped_"): v for k, v in described.items() if k.startswith("dropped_")}
        steps.append(("describe: instructions", int(described["instructions_out"]), drops))
    generated = (records.get("generate") or {}).get("summary") or {}
    if "records_out" in generated:
        steps.append(("generate: strong + weak replies", int(generated["records_out"]), {}))
    manifest = _json(root / "pairs" / "manifest.json")
    if isinstance(manifest, dict):
        counts = (manifest.get("stages") or {}).get("pairs") or {}
        drops = {k: v.get("count", 0) for k, v in (manifest.get("drops") or {}).items() if isinstance(v, dict)}
        balance = {k: drops.pop(k) for k in ("language_quota", "length_bias") if k in drops}
        if "passed_checks" in counts:
            steps.append(("pairs: passed checks", int(counts["passed_checks"]), {k: v for k, v in drops.items() if v}))
        if "out" in counts:
            steps.append(("pairs: written (balanced)", int(counts["out"]), {k: v for k, v in balance.items() if v}))
    return steps


def _funnel_section(root: Path, records: dict[str, dict[str, Any]], plots: Plots) -> list[str]:
    steps = funnel_steps(root, records)
    if not steps:
        return []
    plt = plots.plt
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(steps) + 1.2))
    names = [s[0] for s in steps][::-1]
    kept = [s[1] for s in steps][::-1]
    ax.barh(names, kept, color="tab:blue")
    for y, value in enumerate(kept):
        ax.text(value, y, f" {value}", va="center", fontsize=8)
    ax.set_xlabel("documents / pairs kept")
    ax.set_title("Data funnel")
    lines = ["## Data funnel", "", plots.save(fig, "funnel.png", "data funnel"), ""]
    rows = [
        (name, count, ", ".join(f"{k}: {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])) or "-")
        for name, count, drops in steps
    ]
    return lines + _table(("step", "kept", "dropped (reason: count)"), rows)


def _pair_rows(pairs_dir: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for split in SPLITS:
        for file in split_files(pairs_dir, split):
            rows.extend({**r, "split": split} for r in _read_parquet(file, columns).to_pylist())
    return rows


def _pairs_section(root: Path, plots: Plots) -> list[str]:
    pairs_dir = root / "pairs"
    rows = _pair_rows(pairs_dir, ("chosen_tokens", "rejected_tokens"))
    manifest = _json(pairs_dir / "manifest.json")
    bias = manifest.get("length_bias") if isinstance(manifest, dict) else None
    if not rows and not isinstance(bias, dict):
        return []
    lines = ["## Preference pairs", ""]
    plt = plots.plt
    chosen = [r["chosen_tokens"] for r in rows if r.get("chosen_tokens") is not None]
    rejected = [r["rejected_tokens"] for r in rows if r.get("rejected_tokens") is not None]
    if chosen and rejected:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        top = max(max(chosen), max(rejected))
        bins = [top * i / 20 for i in range(21)] if top > 0 else 10
        ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {sum(chosen) / len(chosen):.0f})")
        ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {sum(rejected) / len(rejected):.0f})")
        ax.set_xlabel("reply length (generator tokens)")
        ax.set_ylabel("pairs")
        ax.set_title(f"Chosen vs rejected length ({len(chosen)} pairs written)")
        ax.legend()
        lines += [plots.save(fig, "lengths.png", "chosen vs rejected lengths"), ""]
    if isinstance(bias, dict) and any(isinstance(bias.get(k), int | float) for k in ("before", "after")):
        labels = [
            k for k in ("before", "after", "after_train", "after_heldout") if isinstance(bias.get(k), int | float)
        ]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(labels, [bias[k] for k in labels], color="tab:orange")
        target = bias.get("target")
        if isinstance(target, int | float):
            tol = bias.get("tolerance") or 0
            ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target} ± {tol}")
            ax.axhspan(target - tol, target + tol, color="grey", alpha=0.15)
            ax.legend()
        ax.set_ylim(0, 1)
        ax.set_ylabel("share chosen longer")
        ax.set_title("Length bias, before and after balancing")
        lines += [plots.save(fig, "length_bias.png", "length bias before/after balancing"), ""]
        figures = ", ".join(f"{k} {bias[k]:.3f}" for k in labels)
        lines.append(
            f"Length bias ({bias.get('definition', 'share of pairs whose chosen reply is longer')}): {figures}."
        )
        parses = manifest.get("parses") if isinstance(manifest, dict) else None
        if isinstance(parses, dict) and all(isinstance(parses.get(k), int | float) for k in ("chosen", "rejected")):
            lines.append(f"Code that parses: chosen {parses['chosen']:.0%}, rejected {parses['rejected']:.0%}.")
    return lines


def _training_section(root: Path, records: dict[str, dict[str, Any]], plots: Plots) -> list[str]:
    lines: list[str] = []
    rows = []
    for stage in ("pretrain", "finetune"):
        history = _jsonl(root / stage / "metrics.jsonl")
        if not history:
            continue
        plt = plots.plt
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
        steps = [r["step"] for r in history]
        left.plot(steps, [r["loss"] for r in history], label="total", marker="." if len(steps) <= 50 else None)
        for part in ("ranking", "lm"):
            if any(r.get(part) for r in history):
                left.plot(steps, [r.get(part) for r in history], label=part, alpha=0.7)
        left.set_xlabel("optimizer step")
        left.set_title(f"{stage}: loss")
        left.legend()
        right.plot(steps, [r["accuracy"] for r in history], color="tab:green", marker="." if len(steps) <= 50 else None)
        right.set_ylim(-0.02, 1.02)
        right.set_xlabel("optimizer step")
        right.set_title(f"{stage}: training pair accuracy")
        lines += [plots.save(fig, f"{stage}.png", f"{stage} loss and accuracy"), ""]
        summary = (records.get(stage) or {}).get("summary") or {}
        last = history[-1]
        rows.append(
            (stage, summary.get("pairs"), last["step"], last["loss"], last["accuracy"], summary.get("resumed_from"))
        )
    if not rows:
        return []
    table = _table(("stage", "pairs", "steps", "final loss", "final accuracy", "resumed from step"), rows)
    return ["## Reward-model training", "", *lines, *table]


def _finetune_data_section(root: Path) -> list[str]:
    summary = _json(root / "finetune" / "data" / "summary.json")
    if not isinstance(summary, dict):
        return []
    keys = ("problems", "k", "candidates", "pass_rate", "sampled_statuses", "canonical_passed", "sandbox_errors",
            "problems_with_pairs", "pairs", "pairs_with_canonical_chosen")  # fmt: skip
    rows = [(k, _inline(summary[k])) for k in keys if k in summary]
    span = summary.get("task_ids")
    text = (
        "Execution-labelled HumanEval pairs: sampled solutions (and each problem's canonical solution) run "
        "against the problem's tests; a passing candidate is chosen, a failing one of the same problem rejected."
    )
    if isinstance(span, list) and span:
        text += f" Problems {span[0]} .. {span[-1]} (the end of HumanEval; Best-of-N evaluates from the start)."
    return ["## Finetuning data", "", text, "", *_table(("figure", "value"), rows)]


def _inline(value: Any) -> Any:
    return ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else value


def _accuracy_rows(node: Any, path: str = "") -> Iterable[tuple[str, Any, Any]]:
    """Every dict holding a numeric `accuracy`, wherever the evaluate stage put it, as (where, accuracy, n)."""
    if isinstance(node, dict):
        if isinstance(node.get("accuracy"), int | float):
            yield re.sub(r"\.by_(\w+)\.", r": \1 = ", path) or "heldout", node["accuracy"], node.get("n")
        for key, value in node.items():
            if key != "accuracy":
                yield from _accuracy_rows(value, f"{path}.{key}" if path else str(key))


def _evaluate_section(root: Path) -> list[str]:
    evaldir = root / "evaluate"
    results = _json(evaldir / "results.json")
    pngs = sorted(evaldir.glob("*.png")) if evaldir.is_dir() else []
    if not isinstance(results, dict) and not pngs:
        return []
    lines = ["## Evaluation", ""]
    rows = list(_accuracy_rows(results)) if isinstance(results, dict) else []
    if rows:
        lines += ["Reward-model accuracy (share of pairs with r(chosen) > r(rejected), ties half):", ""]
        lines += [*_table(("pairs", "accuracy", "n"), rows), ""]
    for name in ("humaneval", "math"):
        block = results.get(name) if isinstance(results, dict) else None
        if isinstance(block, dict) and isinstance(block.get("curve"), dict):
            lines += [*_bon_table(name, block), ""]
    lines += _sandbox_warning(results)
    lines += [f"![{png.stem}](evaluate/{png.name})" for png in pngs]
    return lines


def _sandbox_warning(results: Any) -> list[str]:
    """A loud line when HumanEval programs ran without an isolation layer (`sdk.sandbox.layers()["missing"]`)."""
    humaneval = results.get("humaneval") if isinstance(results, dict) else None
    sandbox = humaneval.get("sandbox") if isinstance(humaneval, dict) else None
    active = sandbox.get("layers") if isinstance(sandbox, dict) else None
    if not isinstance(active, dict):
        return []
    missing = active.get("missing") or ([f"all (the sandbox failed: {active['error']})"] if "error" in active else [])
    if not missing:
        return []
    return [f"**Warning: HumanEval programs ran without these sandbox layers: {', '.join(missing)}.**", ""]


def _bon_table(name: str, block: dict[str, Any]) -> list[str]:
    """Best-of-N solve rate per N: the RM's pick (mean ± std over draws) against random, voting and oracle."""
    curve = block["curve"]
    ns = curve.get("n") or []

    def at(key: str, i: int) -> str:
        value = curve.get(key)
        if isinstance(value, dict):  # {"mean": [...], "std": [...]}
            mean, std = value.get("mean") or [], value.get("std") or []
            return f"{mean[i]:.3f} ± {std[i]:.3f}" if i < len(mean) and i < len(std) else ""
        return f"{value[i]:.3f}" if isinstance(value, list) and i < len(value) else ""

    columns = [c for c in ("rm", "random", "majority", "weighted_vote", "oracle") if c in curve]
    rows = [(n, *(at(c, i) for c in columns)) for i, n in enumerate(ns)]
    rate = block.get("sample_pass_rate")
    intro = f"Best-of-N on {name} ({block.get('problems', curve.get('problems', '?'))} problems"
    intro += f", sample pass rate {rate:.3f})" if isinstance(rate, int | float) else ")"
    return [intro + ": share of problems whose picked candidate passes.", "", *_table(("N", *columns), rows)]


def _samples_section(root: Path) -> list[str]:
    rows = _pair_rows(root / "pairs", ("id", "prompt", "chosen", "rejected"))
    if not rows:
        return []
    picked = [r for r in rows if r["split"] == "heldout"][:SAMPLE_PAIRS] or rows[:SAMPLE_PAIRS]
    lines = ["## Sample pairs", ""]
    for row in picked:
        lines.append(f"**{row.get('id', '?')}** ({row['split']})")
        for part in ("prompt", "chosen", "rejected"):
            lines += [f"- {part}:", "", "~~~~text", _truncate(row[part]), "~~~~", ""]
    return lines


def _truncate(text: str) -> str:
    text = text.replace("~~~~", "~ ~ ~ ~")  # keep the sample inside its fence
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS].rstrip() + f"\n[... {len(text)} chars in all]"


def _determinism_section(root: Path) -> list[str]:
    digests = pairs_digest(root / "pairs")
    if not digests:
        return []
    rows = [(split, d["rows"], f"`{d['sha256']}`") for split, d in digests.items()]
    return [
        "## Determinism",
        "",
        "Every sampling step is seeded per request and every balancing step is seeded, so two runs of the same "
        "spec and seeds write the same pairs, row for row: these content hashes (sha256 over the rows in order) "
        "are identical between them.",
        "",
        *_table(("split", "rows", "sha256"), rows),
    ]


def write_report(spec: Spec, layout: RunLayout) -> Path:
    """Write WORKDIR/report.md (+ WORKDIR/report/*.png) from what the run's stages left; returns its path."""
    root = layout.root
    records = stage_records(layout)
    plots = Plots(root)
    parts = [
        [
            f"# codepmp run `{spec.name}`",
            "",
            f"Spec as run: [spec.resolved.yaml](spec.resolved.yaml). Stages declared: "
            f"{', '.join(declared_names(spec)) or 'none'}.",
        ],
        _stages_section(spec, records),
    ]
    builders: list[tuple[str, Callable[[], list[str]]]] = [
        ("data funnel", lambda: _funnel_section(root, records, plots)),
        ("preference pairs", lambda: _pairs_section(root, plots)),
        ("reward-model training", lambda: _training_section(root, records, plots)),
        ("finetuning data", lambda: _finetune_data_section(root)),
        ("evaluation", lambda: _evaluate_section(root)),
        ("sample pairs", lambda: _samples_section(root)),
        ("determinism", lambda: _determinism_section(root)),
    ]
    for title, build in builders:
        try:
            parts.append(build())
        except Exception as exc:  # one unreadable input costs its section, not the report
            parts.append([f"_(section '{title}' left out: {type(exc).__name__}: {exc})_"])
    text = "\n\n".join("\n".join(p) for p in parts if p) + "\n"
    path = root / "report.md"
    atomic_write_text(path, text)
    return path
