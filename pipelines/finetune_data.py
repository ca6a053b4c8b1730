"""`humaneval-exec`: reasoning preference pairs labelled by execution, built offline for the finetune stage.

For each of the *last* `problems` HumanEval problems (Best-of-N evaluates from the start, and the spec
refuses overlapping counts), the generator samples `k` chat replies; each reply, and the problem's
canonical solution written as a reply, is turned into a completion and run against the problem's tests
in the sandbox. A passing reply is `chosen`, a failing reply to the same prompt `rejected`. The
canonical solution is there because a small model rarely passes: without it most problems would give
no pair. It is written the way the prompt asks the model to answer (the whole function in one fenced
block) so both sides of a pair have the form Best-of-N later scores: a chat reply to that prompt.

Resumable: samples are cached per request (`sdk.humaneval.sample`) and labels per program as each run
finishes (`sdk.evaluation.label_programs`, the evaluate stage's cache), so a killed build redoes neither.
Rebuilding from the caches is deterministic.

Rows: `prompt`, `chosen`, `rejected` (chat replies), `task_id`, `chosen_source` (`sample`/`canonical`),
`rejected_status` (a sandbox status) and `rejected_detail`: one word of `sdk.sandbox.REASONS` saying why the
rejected reply failed (`assertion`, `syntax`, `early-exit`, `timeout`, ...), never the program's own output.
The sandbox's free-text `detail` (the program's last stderr line, at most 300 characters, whatever it chose to
print) stays in the label cache (`labels.jsonl`) for people and is not training data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.spec import HumanEvalExecSpec
from sdk.engine import close_idle
from sdk.errors import RunError
from sdk.fileio import atomic_path, atomic_write_json

OUTPUT = "humaneval-exec.parquet"
SAMPLES = "samples.jsonl"
LABELS = "labels.jsonl"
SUMMARY = "summary.json"
FAILED = ("failed", "timeout", "memory")  # the candidate's fault; "error" is the sandbox's, never a label


@dataclass(frozen=True)
class Candidate:
    """One reply to one problem, with its execution label."""

    task_id: str
    source: str  # "sample" or "canonical"
    index: int  # sample number; -1 for the canonical solution
    reply: str
    completion: str
    status: str = ""
    detail: str = ""  # a word of sdk.sandbox.REASONS


def canonical_reply(problem: dict[str, Any]) -> str:
    """The canonical solution as the prompt asks for an answer: the complete function in one python block
    (leading blank lines dropped, as a model's block starts with code)."""
    return f"```python\n{problem['prompt'].lstrip(chr(10))}{problem['canonical_solution'].rstrip()}\n```"


def pair_candidates(candidates: list[Candidate], cap: int) -> list[tuple[Candidate, Candidate]]:
    """(chosen, rejected) pairs of one problem: passing x failing, at most `cap`, deterministic.

    Identical replies count once. Pairs are taken in diagonal order over the two lists ((p0, f0), then
    (p0, f1), (p1, f0), ...), so a capped problem still uses many different candidates; sampled passes come
    before the canonical solution, whose form differs a little from the model's replies.
    """
    seen: set[str] = set()
    unique = []
    for cand in candidates:
        if cand.reply not in seen:
            seen.add(cand.reply)
            unique.append(cand)
    passing = sorted((c for c in unique if c.status == "passed"), key=lambda c: (c.source == "canonical", c.index))
    failing = [c for c in unique if c.status in FAILED]
    grid = sorted(((i, j) for i in range(len(passing)) for j in range(len(failing))), key=lambda ij: (sum(ij), ij))
    return [(passing[i], failing[j]) for i, j in grid[:cap]]


def label(
    problems: dict[str, dict[str, Any]], candidates: list[Candidate], cfg: HumanEvalExecSpec, path: Path
) -> list[Candidate]:
    """Every candidate with its sandbox label; each label is cached as its run finishes, so a rerun executes
    only the programs not labelled yet (identical programs run once)."""
    from sdk.evaluation import label_programs
    from sdk.humaneval import program
    from sdk.sandbox import reason

    labels = label_programs(
        [program(problems[c.task_id], c.completion) for c in candidates],
        timeout_s=cfg.sandbox.timeout_s,
        memory_mb=cfg.sandbox.memory_mb,
        cache_path=path,
        desc="humaneval-exec: run tests",
    )
    return [
        replace(c, status=got["status"], detail=reason(got["status"], got["detail"]))
        for c, got in zip(candidates, labels, strict=True)
    ]


def build_humaneval_exec(cfg: HumanEvalExecSpec, outdir: Path) -> tuple[Path, dict[str, Any]]:
    """Sample, execute and pair; writes `outdir/humaneval-exec.parquet` and `outdir/summary.json`."""
    from sdk import humaneval

    outdir.mkdir(parents=True, exist_ok=True)
    problems = humaneval.load_problems(cfg.problems, from_end=True)
    by_id = {p["task_id"]: p for p in problems}
    replies = humaneval.sample(problems, cfg.generator, cfg.k, outdir / SAMPLES, desc="humaneval-exec: sample")
    close_idle()  # the sampling engine: training comes next
    candidates = []
    for p in problems:
        tid = p["task_id"]
        for j, reply in enumerate(replies[tid]):
            candidates.append(Candidate(tid, "sample", j, reply, humaneval.completion_from_reply(p, reply)))
        reply = canonical_reply(p)
        candidates.append(Candidate(tid, "canonical", -1, reply, humaneval.completion_from_reply(p, reply)))
    labelled = label(by_id, candidates, cfg, outdir / LABELS)

    rows: list[dict[str, Any]] = []
    with_pairs = 0
    for p in problems:
        pairs = pair_candidates([c for c in labelled if c.task_id == p["task_id"]], cfg.max_pairs_per_problem)
        with_pairs += bool(pairs)
        prompt = humaneval.problem_prompt(p)
        for chosen, rejected in pairs:
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen.reply,
                    "rejected": rejected.reply,
                    "task_id": p["task_id"],
                    "chosen_source": chosen.source,
                    "rejected_status": rejected.status,
                    "rejected_detail": rejected.detail,
                }
            )
    sampled = [c for c in labelled if c.source == "sample"]
    canonical = [c for c in labelled if c.source == "canonical"]
    statuses: dict[str, int] = {}
    for c in sampled:
        statuses[c.status] = statuses.get(c.status, 0) + 1
    summary = {
        "problems": len(problems),
        "task_ids": [p["task_id"] for p in problems],
        "k": cfg.k,
        "candidates": len(labelled),
        "sampled_statuses": dict(sorted(statuses.items())),
        "pass_rate": round(statuses.get("passed", 0) / len(sampled), 4) if sampled else None,
        "canonical_passed": sum(c.status == "passed" for c in canonical),
        "sandbox_errors": sum(c.status == "error" for c in labelled),
        "problems_with_pairs": with_pairs,
        "pairs": len(rows),
        "pairs_with_canonical_chosen": sum(r["chosen_source"] == "canonical" for r in rows),
    }
    if not rows:
        raise RunError(
            f"humaneval-exec: no problem had both a passing and a failing candidate ({summary['sampled_statuses']}, "
            f"canonical passed {summary['canonical_passed']}/{len(canonical)}); see {outdir / LABELS}"
        )
    path = outdir / OUTPUT
    _write_parquet(rows, path)
    atomic_write_json(outdir / SUMMARY, summary)
    return path, summary


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
