"""HumanEval harness: hand-written correct and broken candidates get the right pass/fail labels, chat replies
become runnable completions, and hostile candidates are contained and reported as failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sdk import humaneval as he
from sdk.config import GeneratorSpec

LIMITS = {"timeout_s": 5, "memory_mb": 512}


@pytest.fixture(scope="module")
def problems():
    return {p["task_id"]: p for p in he.load_problems(5)}


def test_problems_come_in_task_order_from_either_end():
    first = he.load_problems(3)
    assert [p["task_id"] for p in first] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert [p["task_id"] for p in he.load_problems(2, from_end=True)] == ["HumanEval/162", "HumanEval/163"]
    everything = he.load_problems()
    assert len(everything) == 164
    assert {"task_id", "prompt", "entry_point", "test", "canonical_solution"} <= set(first[0])
    assert not {p["task_id"] for p in he.load_problems(100)} & {
        p["task_id"] for p in he.load_problems(64, from_end=True)
    }


def test_hand_written_candidates_get_the_right_labels(problems):
    truncate = problems["HumanEval/2"]
    below_zero = problems["HumanEval/3"]
    cases = [
        (truncate, "    return number % 1.0\n", True),
        (truncate, "    return number - int(number)\n", True),
        (truncate, "    return int(number)\n", False),  # the integer part, not the decimals
        (truncate, "    return number % 1.0 +\n", False),  # syntax error
        (below_zero, he.completion_from_reply(below_zero, _full_below_zero(correct=True)), True),
        (below_zero, he.completion_from_reply(below_zero, _full_below_zero(correct=False)), False),
        (problems["HumanEval/0"], problems["HumanEval/0"]["canonical_solution"], True),
        (problems["HumanEval/4"], problems["HumanEval/4"]["canonical_solution"], True),
        (problems["HumanEval/4"], "    return 0.0\n", False),
    ]
    results = he.check([c[0] for c in cases], [c[1] for c in cases], **LIMITS)
    assert [r.passed for r in results] == [c[2] for c in cases]
    assert results[2].detail.startswith("AssertionError") and "SyntaxError" in results[3].detail


def _full_below_zero(correct: bool) -> str:
    op = "<" if correct else "<="
    return (
        "Here is the function:\n\n```python\nfrom typing import List\n\n"
        "def below_zero(operations: List[int]) -> bool:\n"
        "    balance = 0\n    for op in operations:\n        balance += op\n"
        f"        if balance {op} 0:\n            return True\n    return False\n\n"
        "print(below_zero([1, 2, -4]))\n\nif __name__ == '__main__':\n    input()\n```\n"
        "It keeps a running balance."
    )


def test_reply_forms_become_the_same_working_completion(problems):
    p = problems["HumanEval/2"]
    replies = [
        "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```",
        "Sure.\n```\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone.",
        "```python\nimport math\n\ndef truncate_number(number: float) -> float:\n"
        "    return number - math.floor(number)\n\nassert truncate_number(2.5) == 0.5\n",  # unterminated fence
        "return number % 1.0",  # a bare body, unindented
        "    return number % 1.0\n",  # a bare body, indented
        "```text\nusage notes\n```\n```python\ndef helper(x):\n    return x % 1.0\n\n\n"
        "def truncate_number(number: float) -> float:\n    return helper(number)\n```",
    ]
    completions = [he.completion_from_reply(p, r) for r in replies]
    assert all(r.passed for r in he.check([p] * len(completions), completions, **LIMITS)), completions
    assert "assert truncate_number" not in completions[2]  # top-level example code is dropped


def test_answer_key_ignores_formatting_and_comments(problems):
    p = problems["HumanEval/2"]
    a = he.answer_key(p, "    return number % 1.0\n")
    b = he.answer_key(p, "    # decimals\n    return (number  %  1.0)\n")
    assert a == b != he.answer_key(p, "    return number - int(number)\n")


HOSTILE = {
    "loop": "    while True:\n        pass\n",
    "memory": "    blocks = []\n    while True:\n        blocks.append(bytearray(10_000_000))\n",
    "fork": "    import os\n    while True:\n        os.fork()\n",
    "write": "    open({target!r}, 'w').write('pwned')\n    return number % 1.0\n",
}


def test_hostile_candidates_are_contained_and_reported_as_failures(problems, tmp_path):
    p = problems["HumanEval/2"]
    target = str(tmp_path / "escaped.txt")
    completions = [c.format(target=target) for c in HOSTILE.values()]
    start = time.monotonic()
    results = he.check([p] * len(completions), completions, timeout_s=2, memory_mb=256, workers=2)
    assert time.monotonic() - start < 20
    statuses = dict(zip(HOSTILE, (r.status for r in results), strict=True))
    assert statuses == {"loop": "timeout", "memory": "memory", "fork": "failed", "write": "failed"}
    assert not any(r.passed for r in results)
    assert not Path(target).exists()


def test_request_ids_change_with_every_setting_but_not_with_k(problems):
    p = problems["HumanEval/0"]
    base = GeneratorSpec.model_validate({"model": {"name": "smollm2-135m-instruct"}})
    hotter = GeneratorSpec.model_validate({"model": {"name": "smollm2-135m-instruct"}, "sampling": {"temperature": 1}})
    rids = he.request_ids(p, base, 4)
    assert len(set(rids)) == 4 and rids[0].startswith("HumanEval/0#")
    assert he.request_ids(p, base, 8)[:4] == rids  # raising k keeps the samples already drawn
    assert not set(he.request_ids(p, hotter, 4)) & set(rids)
    assert not set(he.request_ids(problems["HumanEval/1"], base, 4)) & set(rids)


def test_sample_serves_a_complete_cache_without_loading_a_model(problems, tmp_path, monkeypatch):
    from sdk.engine import RequestCache

    spec = GeneratorSpec.model_validate({"model": {"name": "/nonexistent/model"}})
    cache = RequestCache(tmp_path / "requests.jsonl")
    chosen = [problems["HumanEval/0"], problems["HumanEval/2"]]
    for p in chosen:
        for j, rid in enumerate(he.request_ids(p, spec, 2)):
            cache.append(rid, [{"text": f"{p['task_id']} {j}"}])
    monkeypatch.setattr(he, "_generate", lambda *a, **k: pytest.fail("a cached problem was sampled again"))
    out = he.sample(chosen, spec, 2, cache.path)
    assert out == {"HumanEval/0": ["HumanEval/0 0", "HumanEval/0 1"], "HumanEval/2": ["HumanEval/2 0", "HumanEval/2 1"]}
