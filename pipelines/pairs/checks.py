"""The pair checks: which (chosen, rejected) pairs would teach a reward model nothing, or the wrong thing.

A pair is dropped for the first check it fails, in the order of `REASONS`, so each pair counts once in the
drop table. The empty and identity checks look at the extracted code (see `extract.py`), not the chat around
it; the loop check reads the whole reply, since a loop in the prose is as degenerate as one in the code.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

from pipelines.pairs.extract import Extraction
from pipelines.spec import PairChecks

EMPTY = "empty"
TRUNCATED = "truncated"
REPETITION = "repetition"
IDENTICAL = "identical"
NEAR_IDENTICAL = "near_identical"
REASONS: tuple[str, ...] = (EMPTY, TRUNCATED, REPETITION, IDENTICAL, NEAR_IDENTICAL)

# Repeated blocks of up to this many lines are looked for (a model looping over a short stanza).
_MAX_BLOCK_LINES = 8
# A block must repeat back to back at least this often to count as a loop rather than parallel code.
_MIN_BLOCK_REPEATS = 3


@dataclass(frozen=True)
class Side:
    """One reply of a pair with what the checks need."""

    text: str
    finish_reason: str | None
    tokens: int
    code: Extraction


# Code tokens for comparison: identifiers/numbers and single punctuation characters; layout is ignored.
_TOKEN = re.compile(r"\w+|[^\w\s]")


def code_tokens(code: str) -> list[str]:
    return _TOKEN.findall(code)


def similarity(a: Sequence[str], b: Sequence[str], threshold: float) -> float:
    """difflib ratio of two token sequences, short-circuited by its cheap upper bounds when below `threshold`.

    The bounds are difflib's `real_quick_ratio` (lengths) and `quick_ratio` (multiset overlap), computed with
    `Counter` instead of building a `SequenceMatcher` (whose index alone costs more than both). A pair below
    either bound cannot reach the threshold, so the quadratic `ratio` runs only for the few close pairs.
    Tokens rather than characters: a sequence ~4x shorter with a rich alphabet keeps `ratio` fast, and a
    token edit is what a near-duplicate program differs by.
    """
    total = len(a) + len(b)
    if not total:
        return 1.0
    length_bound = 2 * min(len(a), len(b)) / total  # real_quick_ratio
    if length_bound < threshold:
        return length_bound
    overlap_bound = 2 * (Counter(a) & Counter(b)).total() / total  # quick_ratio
    if overlap_bound < threshold:
        return overlap_bound
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


def _content_lines(text: str) -> list[str]:
    """Stripped non-blank lines that carry a word: lone `}` / `)` / `\"\"\"` lines repeat in any healthy code."""
    return [s for s in (line.strip() for line in text.splitlines()) if any(c.isalnum() for c in s)]


def is_repetition_loop(text: str, max_line_share: float, min_lines: int) -> bool:
    """Whether a reply is stuck in a loop: one line, or one block of lines repeated back to back, dominates it.

    Looked at: the most frequent line's share of all content lines, and for blocks of 2..8 lines the longest
    back-to-back run (at least 3 repeats) as a share of the lines. Replies under `min_lines` content lines
    are too short to call.
    """
    lines = _content_lines(text)
    if len(lines) < min_lines:
        return False
    n = len(lines)
    counts = Counter(lines)
    if counts.most_common(1)[0][1] / n >= max_line_share:
        return True
    # Every line of a qualifying block run occurs >= 3 times: when such lines cover too little, no run can.
    if sum(c for c in counts.values() if c >= _MIN_BLOCK_REPEATS) / n < max_line_share:
        return False
    for width in range(2, min(_MAX_BLOCK_LINES, n // _MIN_BLOCK_REPEATS) + 1):
        start = 0
        while start + 2 * width <= n:
            repeats = 1
            while lines[start + repeats * width : start + (repeats + 1) * width] == lines[start : start + width]:
                repeats += 1
            if repeats >= _MIN_BLOCK_REPEATS and repeats * width / n >= max_line_share:
                return True
            # Inside a run, later starts only find shorter runs of the same block: jump to its last repeat.
            start += (repeats - 1) * width if repeats > 1 else 1
    return False


def _is_empty(side: Side) -> bool:
    """No reply, or a reply whose only code is an empty fence (the paper's drop rule)."""
    return side.code.kind == "empty"


def check_pair(chosen: Side, rejected: Side, checks: PairChecks) -> str | None:
    """The reason to drop this pair (one of `REASONS`), or None to keep it."""
    sides = (chosen, rejected)
    if checks.drop_empty and any(_is_empty(s) for s in sides):
        return EMPTY
    if checks.drop_truncated and any(
        s.finish_reason == "length" for s in ((chosen,) if checks.keep_truncated_rejected else sides)
    ):
        return TRUNCATED
    if checks.drop_repetition and any(
        is_repetition_loop(s.text, checks.repetition_max_line_share, checks.repetition_min_lines) for s in sides
    ):
        return REPETITION
    a, b = code_tokens(chosen.code.content), code_tokens(rejected.code.content)
    if a == b:  # same tokens: at most layout differs
        return IDENTICAL
    if similarity(a, b, checks.near_identical_similarity) >= checks.near_identical_similarity:
        return NEAR_IDENTICAL
    return None
