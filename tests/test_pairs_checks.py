"""One test group per pair check: cases that must be dropped and realistic cases that must survive."""

from __future__ import annotations

from difflib import SequenceMatcher

import pytest

from pipelines.pairs.checks import (
    EMPTY,
    IDENTICAL,
    NEAR_IDENTICAL,
    REPETITION,
    TRUNCATED,
    check_pair,
    code_tokens,
    is_repetition_loop,
    similarity,
)
from pipelines.spec import PairChecks
from tests.pairs_helpers import STRONG_REPLY, WEAK_REPLY, side

DEFAULT = PairChecks()


def test_a_good_pair_survives_every_check() -> None:
    assert check_pair(side(STRONG_REPLY), side(WEAK_REPLY), DEFAULT) is None


# --------------------------------------------------------------------------- empty


@pytest.mark.parametrize(
    "empty",
    ["", "   \n", "```python\n```", "Here is the code:\n\n```python\n\n```\n", "```\n```\n```py\n  \n```"],
)
@pytest.mark.parametrize("which", ["chosen", "rejected"])
def test_empty_side_or_only_an_empty_fence_is_dropped(empty: str, which: str) -> None:
    good = side(STRONG_REPLY)
    pair = (side(empty), good) if which == "chosen" else (good, side(empty))
    assert check_pair(*pair, DEFAULT) == EMPTY


def test_short_but_real_code_is_not_empty() -> None:
    assert check_pair(side(STRONG_REPLY), side("```python\nprint(sorted(set(x)))\n```"), DEFAULT) is None


def test_empty_check_can_be_switched_off() -> None:
    assert check_pair(side(STRONG_REPLY), side(""), PairChecks(drop_empty=False)) is None


# --------------------------------------------------------------------------- identical / near-identical


def test_identical_code_with_different_prose_is_dropped() -> None:
    code = "```python\ndef square(x):\n    return x * x\n```"
    assert check_pair(side(f"Sure! Here it is:\n\n{code}\n\nHope this helps."), side(code), DEFAULT) == IDENTICAL


def test_whitespace_only_differences_are_identical() -> None:
    a = "```python\ndef square(x):\n    return x * x\n```"
    b = "```python\ndef square(x):   \n\n\n    return x * x\n\n```"
    assert check_pair(side(a), side(b), DEFAULT) == IDENTICAL


def test_near_identical_code_is_dropped() -> None:
    strong = side(STRONG_REPLY)
    one_char_off = side(STRONG_REPLY.replace("start <= merged", "start < merged"))
    assert check_pair(strong, one_char_off, DEFAULT) == NEAR_IDENTICAL


def test_different_implementations_survive_and_threshold_is_configurable() -> None:
    strong = side(STRONG_REPLY)
    renamed = side(STRONG_REPLY.replace("merged", "out").replace("intervals", "spans"))
    assert check_pair(strong, renamed, DEFAULT) is None
    assert check_pair(strong, renamed, PairChecks(near_identical_similarity=0.5)) == NEAR_IDENTICAL


def test_similarity_skips_the_quadratic_ratio_when_a_bound_rules_it_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(self: SequenceMatcher) -> float:
        raise AssertionError("ratio() computed although quick_ratio was below the threshold")

    monkeypatch.setattr(SequenceMatcher, "ratio", forbidden)
    a, b = code_tokens("def f(x):\n    return x\n"), code_tokens("class Registry:\n    items = {}\n")
    assert similarity(a, b, 0.95) < 0.95


# --------------------------------------------------------------------------- truncated


@pytest.mark.parametrize("which", ["chosen", "rejected"])
def test_a_side_cut_by_the_token_limit_is_dropped(which: str) -> None:
    cut = side("```python\ndef merge(a):\n    res = []\n    for x in", finish="length")
    pair = (cut, side(WEAK_REPLY)) if which == "chosen" else (side(STRONG_REPLY), cut)
    assert check_pair(*pair, DEFAULT) == TRUNCATED


def test_truncation_check_is_configurable() -> None:
    cut = side(WEAK_REPLY, finish="length")
    assert check_pair(side(STRONG_REPLY), cut, PairChecks(drop_truncated=False)) is None


def test_a_rambling_rejected_side_can_be_kept_but_never_a_cut_chosen() -> None:
    lenient = PairChecks(keep_truncated_rejected=True)
    cut = side(WEAK_REPLY, finish="length")
    assert check_pair(side(STRONG_REPLY), cut, lenient) is None
    assert check_pair(side(STRONG_REPLY, finish="length"), side(WEAK_REPLY), lenient) == TRUNCATED


# --------------------------------------------------------------------------- repetition


LINE_LOOP = "```python\ndef total(xs):\n    s = 0\n" + "    s += xs[0]\n" * 12 + "    return s\n```"
BLOCK_LOOP = (
    "```python\nimport os\n\n" + "print('checking path')\nif os.path.exists(path):\n    print('found')\n" * 6 + "```"
)
PROSE_LOOP = "The function returns the sum.\n" * 8


@pytest.mark.parametrize("loop", [LINE_LOOP, BLOCK_LOOP, PROSE_LOOP], ids=["line", "block", "prose"])
def test_repetition_loops_are_dropped(loop: str) -> None:
    assert check_pair(side(STRONG_REPLY), side(loop), DEFAULT) == REPETITION
    assert check_pair(side(loop), side(WEAK_REPLY), DEFAULT) == REPETITION


def test_code_with_naturally_repeated_lines_survives() -> None:
    dispatcher = """```python
def handle(event):
    if event.kind == "open":
        return None
    if event.kind == "close":
        return None
    if event.kind == "data":
        process(event.payload)
        return None
    raise ValueError(event.kind)
```"""
    assert not is_repetition_loop(dispatcher, 0.5, 4)
    assert check_pair(side(dispatcher), side(WEAK_REPLY), DEFAULT) is None


def test_closing_brackets_do_not_count_as_repetition() -> None:
    java = "```java\nclass A {\n  void f() {\n    if (x) {\n      g();\n    }\n  }\n}\n```"
    assert not is_repetition_loop(java, 0.5, 4)


def test_too_short_to_call_and_configurable_share() -> None:
    assert not is_repetition_loop("x = 1\nx = 1\nx = 1\n", 0.5, 4)
    three_of_eight = "\n".join(["a = f()"] * 3 + [f"b{i} = g({i})" for i in range(5)])
    assert not is_repetition_loop(three_of_eight, 0.5, 4)
    assert is_repetition_loop(three_of_eight, 0.3, 4)
    assert check_pair(side(STRONG_REPLY), side(LINE_LOOP), PairChecks(drop_repetition=False)) is None


def test_first_failing_check_names_the_reason() -> None:
    cut_and_empty = side("", finish="length")
    assert check_pair(cut_and_empty, side(WEAK_REPLY), DEFAULT) == EMPTY
    cut_loop = side(LINE_LOOP, finish="length")
    assert check_pair(side(STRONG_REPLY), cut_loop, DEFAULT) == TRUNCATED
