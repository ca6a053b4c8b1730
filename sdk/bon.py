"""Best-of-N selection with a reward model, and (reward-weighted) voting over extracted final answers.

`best_of_n` scores every candidate of every prompt in one `reward_model.score` call (the model batches by
length internally), so N candidates cost one padded forward per batch, not one call each. The best is the
highest score; ties go to the lowest candidate index, so results never depend on sort stability or order of
completion. NaN scores rank last.

Voting, for tasks whose candidates end in a checkable answer (math): candidates whose answers are equivalent
(`math_equal`: `math-verify`, so `\\frac{1}{2}` and `0.5` agree) form a group; majority voting picks the largest
group, reward-weighted voting the group with the highest summed weight. Weights must be non-negative, and a
reward model's scores are logits on an arbitrary scale, so:
- `softmax` (default): w = exp((s - max s) / T). Under the Bradley-Terry model the RM was trained with,
  exp(s) is a candidate's preference strength, so a group's summed weight is its share of the strength; the
  vote is unchanged by adding a constant to all scores.
- `shift`: w = s - min s (the prompt's worst candidate weighs 0).
Group ties go to the group whose first member comes first.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdk.errors import DataError

Weighting = Literal["softmax", "shift"]
CandidateGenerator = Callable[[str, int], Sequence[str]]


@dataclass(frozen=True)
class Vote:
    """Outcome of a vote: the winning answer, the candidate representing it and the group's total weight."""

    answer: str | None  # None when no candidate had an extractable answer
    index: int | None  # majority: the group's first member; weighted: its highest-scoring member
    weight: float
    groups: list[tuple[str, list[int], float]]  # (answer, member indices, summed weight), in first-seen order


@dataclass(frozen=True)
class BestOfN:
    prompt: str
    best: str
    best_index: int
    best_score: float
    ranked: list[tuple[int, str, float]]  # (candidate index, candidate, score), best first
    vote: Vote | None = None  # reward-weighted vote, when an answer extractor was given
    majority: Vote | None = None  # plain majority vote, the baseline

    @property
    def scores(self) -> list[float]:
        """Scores in candidate order."""
        return [s for _, _, s in sorted(self.ranked)]


def rank(scores: Sequence[float]) -> list[int]:
    """Candidate indices, best first: by score descending, then index ascending; NaN last."""
    return sorted(range(len(scores)), key=lambda i: (1, 0.0, i) if math.isnan(scores[i]) else (0, -scores[i], i))


def best_of_n(
    prompts: str | Sequence[str],
    candidates: Sequence[str] | Sequence[Sequence[str]] | None = None,
    *,
    reward_model: Any,
    generator: CandidateGenerator | str | Any | None = None,
    n: int | None = None,
    sampling: Any = None,
    use_chat_template: bool = True,
    cache_path: str | Path | None = None,
    batch_size: int = 16,
    max_length: int = 2048,
    extract: Callable[[str], str | None] | None = None,
    equal: Callable[[str, str], bool] | None = None,
    weighting: Weighting = "softmax",
) -> BestOfN | list[BestOfN]:
    """Pick the best of N candidates per prompt with `reward_model` (a `RewardModel`, or anything with its
    `score(prompts, responses, max_batch=..., max_length=...)`).

    `prompts` is one prompt (then `candidates` is a list of strings and one `BestOfN` comes back) or a list
    (then a list of candidate lists, any lengths, and a list comes back). Without `candidates`, `generator`
    makes `n` per prompt: a callable `(prompt, n) -> list[str]`, or a model (registry name, local dir,
    `ModelSpec` or `GeneratorSpec`) sampled on vLLM with `sampling` (a `SamplingSpec` or dict), requests
    cached in `cache_path` when given. With `extract` (e.g. `extract_answer`), each result also carries
    the reward-weighted vote and the majority vote over the extracted answers (compared with `equal`,
    default `math_equal`).
    """
    single = isinstance(prompts, str)
    prompt_list = [prompts] if single else list(prompts)
    if candidates is None:
        if generator is None:
            raise DataError("best_of_n: give candidates or a generator")
        if n is None or n < 1:
            raise DataError("best_of_n: generator mode needs n >= 1 candidates per prompt")
        cand_lists = generate(prompt_list, generator, n, sampling, use_chat_template, cache_path)
    else:
        if generator is not None:
            raise DataError("best_of_n: give candidates or a generator, not both")
        if isinstance(candidates, str):  # would be ranked character by character
            raise DataError("best_of_n: candidates is a str, expected a list of strings (one per candidate)")
        if not single and any(isinstance(c, str) for c in candidates):
            bad = next(i for i, c in enumerate(candidates) if isinstance(c, str))
            raise DataError(f"best_of_n: candidates of prompt {bad} must be a list of strings")
        cand_lists = [list(candidates)] if single else [list(c) for c in candidates]
    if len(cand_lists) != len(prompt_list):
        raise DataError(f"best_of_n: {len(prompt_list)} prompts but {len(cand_lists)} candidate lists")
    for i, cands in enumerate(cand_lists):
        if not cands:
            raise DataError(f"best_of_n: prompt {i} has no candidates")
        if not all(isinstance(c, str) for c in cands):
            raise DataError(f"best_of_n: candidates of prompt {i} must be a list of strings")

    flat_prompts = [p for p, cands in zip(prompt_list, cand_lists, strict=True) for _ in cands]
    flat_cands = [c for cands in cand_lists for c in cands]
    flat_scores = reward_model.score(flat_prompts, flat_cands, max_batch=batch_size, max_length=max_length)
    results, offset = [], 0
    for prompt, cands in zip(prompt_list, cand_lists, strict=True):
        scores = [float(s) for s in flat_scores[offset : offset + len(cands)]]
        offset += len(cands)
        order = rank(scores)
        votes: dict[str, Vote | None] = {"vote": None, "majority": None}
        if extract is not None:
            answers = [extract(c) for c in cands]
            votes["vote"] = weighted_vote(answers, scores, equal=equal, weighting=weighting)
            votes["majority"] = majority_vote(answers, equal=equal)
        results.append(
            BestOfN(
                prompt=prompt,
                best=cands[order[0]],
                best_index=order[0],
                best_score=scores[order[0]],
                ranked=[(i, cands[i], scores[i]) for i in order],
                **votes,
            )
        )
    return results[0] if single else results


def generate(
    prompts: Sequence[str],
    generator: CandidateGenerator | str | Any,
    n: int,
    sampling: Any = None,
    use_chat_template: bool = True,
    cache_path: str | Path | None = None,
) -> list[list[str]]:
    """`n` candidates per prompt from a callable or a vLLM model (see `best_of_n`)."""
    from sdk.config import GeneratorSpec, ModelSpec

    if callable(generator) and not isinstance(generator, str | ModelSpec | GeneratorSpec):
        out = []
        for i, prompt in enumerate(prompts):
            got = generator(prompt, n)
            if isinstance(got, str | bytes):  # a str of length n would pass as n one-character candidates
                raise DataError(
                    f"best_of_n: generator returned a {type(got).__name__} for prompt {i}, "
                    f"expected a list of {n} strings"
                )
            cands = list(got)
            if len(cands) != n or not all(isinstance(c, str) for c in cands):
                raise DataError(
                    f"best_of_n: generator returned {len(cands)} items for prompt {i}, expected {n} strings"
                )
            out.append(cands)
        return out
    if isinstance(generator, GeneratorSpec):
        spec = generator if sampling is None else generator.model_copy(update={"sampling": _sampling(sampling)})
    else:
        model = generator if isinstance(generator, ModelSpec) else ModelSpec(name=str(generator))
        spec = GeneratorSpec(model=model, sampling=_sampling(sampling))
    return _generate_vllm(prompts, spec, n, use_chat_template, cache_path)


def _sampling(sampling: Any) -> Any:
    from sdk.config import SamplingSpec

    if sampling is None:
        return SamplingSpec()
    return sampling if isinstance(sampling, SamplingSpec) else SamplingSpec.model_validate(sampling)


def _generate_vllm(
    prompts: Sequence[str], spec: Any, n: int, use_chat_template: bool, cache_path: str | Path | None
) -> list[list[str]]:
    """One vLLM request per candidate (own seed, own cache entry); a repeated prompt is sampled once."""
    from sdk.engine import Generator, Request, RequestCache

    sampling = spec.sampling.model_copy(update={"n": 1})
    key = json.dumps([spec.model_dump(mode="json", exclude={"sampling": {"n"}}), use_chat_template], sort_keys=True)
    rids = {p: [f"{hashlib.sha256(f'{key}|{p}'.encode()).hexdigest()[:24]}#{j}" for j in range(n)] for p in prompts}
    with tempfile.TemporaryDirectory(prefix="codepmp-bon-") as tmp:
        cache = RequestCache(Path(cache_path) if cache_path else Path(tmp) / "requests.jsonl")
        done = cache.load()
        todo = {p: ids for p, ids in rids.items() if any(r not in done for r in ids)}
        if todo:
            engine = Generator(spec.model)
            try:
                requests = []
                for prompt, ids in todo.items():
                    tokens = engine.render(prompt, use_chat_template)
                    requests += [Request(rid, tokens) for rid in ids]
                done.update(engine.run(requests, sampling, cache, desc=f"best_of_n ({engine.label})"))
            finally:
                engine.close()
        return [[done[r][0]["text"] for r in rids[p]] for p in prompts]


# --------------------------------------------------------------------------- answers and voting

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the last `\\boxed{...}` (nested braces allowed), else a GSM8K-style
    `#### answer`, else the last number; None when there is none, or when the last box is cut off (the
    answer was truncated: a number before it is not the answer)."""
    if "\\boxed{" in text or "\\fbox{" in text:
        boxed = _last_boxed(text)
        return boxed.strip() if boxed is not None else None
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        if tail:
            return tail.splitlines()[0].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(".").replace(",", "") if numbers else None


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the answer was cut off


def _verify_timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only the main thread may set."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def parse_answer(answer: str) -> list[Any]:
    """`math_verify.parse` of an answer, as LaTeX when it is one (a bare `\\frac12` has no `$` anchors)."""
    from math_verify import parse

    timeout = _verify_timeout()
    parsed = parse(answer, parsing_timeout=timeout)
    if not parsed and "\\" in answer:
        parsed = parse(f"${answer}$", parsing_timeout=timeout)
    return parsed


def math_equal(a: str, b: str) -> bool:
    """Whether two final answers are mathematically equivalent (math-verify; exact text match as fallback)."""
    if a.strip() == b.strip():
        return True
    return _verify(parse_answer(a), parse_answer(b))


def _verify(gold: list[Any], target: list[Any]) -> bool:
    from math_verify import verify

    return bool(gold and target and verify(gold, target, timeout_seconds=_verify_timeout()))


def group_answers(answers: Sequence[str | None], equal: Callable[[str, str], bool] | None = None) -> list[int | None]:
    """Group id per candidate (None when it has no answer); ids count up in order of first appearance.

    Each answer joins the first group whose first member it equals, so grouping is deterministic even if
    `equal` is not transitive. With the default (`math_equal`), each answer is parsed once.
    """
    reps: list[Any] = []
    texts: list[str] = []
    ids: list[int | None] = []
    for ans in answers:
        if ans is None:
            ids.append(None)
        elif equal is not None:
            g = next((g for g, rep in enumerate(reps) if equal(rep, ans)), len(reps))
            reps += [ans] if g == len(reps) else []
            ids.append(g)
        else:
            ids.append(_math_group(ans, texts, reps))
    return ids


def _math_group(answer: str, texts: list[str], reps: list[Any]) -> int:
    text = answer.strip()
    if text in texts:
        return texts.index(text)
    parsed = parse_answer(answer)
    for g, rep in enumerate(reps):
        if _verify(rep, parsed):
            return g
    texts.append(text)
    reps.append(parsed)
    return len(reps) - 1


def vote_weights(scores: Sequence[float], weighting: Weighting = "softmax", temperature: float = 1.0) -> list[float]:
    """Non-negative voting weights from reward scores (see the module docstring)."""
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        return [0.0] * len(scores)
    if weighting == "softmax":
        top = max(finite)
        return [math.exp((s - top) / temperature) if math.isfinite(s) else 0.0 for s in scores]
    if weighting == "shift":
        low = min(finite)
        return [s - low if math.isfinite(s) else 0.0 for s in scores]
    raise DataError(f"weighting must be 'softmax' or 'shift', got {weighting!r}")


def pick_group(groups: Sequence[int | None], weights: Sequence[float]) -> int | None:
    """The group with the highest summed weight (ties: the group seen first); None if no candidate has one."""
    totals: dict[int, float] = {}
    for g, w in zip(groups, weights, strict=True):
        if g is not None:
            totals[g] = totals.get(g, 0.0) + w
    if not totals:
        return None
    return max(totals, key=lambda g: (totals[g], -g))


def weighted_vote(
    answers: Sequence[str | None],
    scores: Sequence[float],
    *,
    equal: Callable[[str, str], bool] | None = None,
    weighting: Weighting = "softmax",
    temperature: float = 1.0,
    groups: Sequence[int | None] | None = None,
) -> Vote:
    """Reward-weighted vote: the answer group with the highest summed weight; its best-scored member is picked."""
    if len(answers) != len(scores):
        raise DataError(f"weighted_vote: {len(answers)} answers but {len(scores)} scores")
    ids = list(groups) if groups is not None else group_answers(answers, equal)
    return _vote(answers, ids, vote_weights(scores, weighting, temperature), scores)


def majority_vote(
    answers: Sequence[str | None],
    *,
    equal: Callable[[str, str], bool] | None = None,
    groups: Sequence[int | None] | None = None,
) -> Vote:
    """Plain majority vote (every candidate weighs 1); the winning group's first member is picked."""
    ids = list(groups) if groups is not None else group_answers(answers, equal)
    return _vote(answers, ids, [1.0] * len(answers), None)


def _vote(
    answers: Sequence[str | None], ids: list[int | None], weights: list[float], scores: Sequence[float] | None
) -> Vote:
    members: dict[int, list[int]] = {}
    totals: dict[int, float] = {}
    for i, (g, w) in enumerate(zip(ids, weights, strict=True)):
        if g is not None:
            members.setdefault(g, []).append(i)
            totals[g] = totals.get(g, 0.0) + w
    groups = [(str(answers[m[0]]), m, totals[g]) for g, m in sorted(members.items())]
    winner = pick_group(ids, weights)
    if winner is None:
        return Vote(None, None, 0.0, groups)
    chosen = members[winner]
    index = chosen[0] if scores is None else rank([scores[i] for i in chosen])[0]
    index = chosen[index] if scores is not None else index
    return Vote(str(answers[chosen[0]]), index, totals[winner], groups)
