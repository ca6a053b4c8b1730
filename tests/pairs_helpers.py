"""Builders for the pairs-stage tests: hand-written replies and fake `generate` output in the contract format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from pipelines.pairs.checks import Side
from pipelines.pairs.extract import extract_code
from pipelines.spec import Spec
from pipelines.stage import RunLayout

# A strong-model style answer and a weaker one to the same instruction: different, both plausible.
STRONG_REPLY = '''Here is an implementation that merges overlapping intervals:

```python
def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping closed intervals and return them sorted by start."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
```

The intervals are sorted once, so the function runs in O(n log n).
'''

WEAK_REPLY = """```python
def merge(a):
    res = []
    for x in a:
        if res and x[0] < res[-1][1]:
            res[-1][1] = x[1]
        else:
            res.append(x)
    return res
```
"""

SPEC: dict[str, Any] = {
    "name": "t",
    "source": {"paths": ["stdlib"], "limit": 3},
    "describe": {"model": {"name": "m"}},
    "generate": {"strong": {"model": {"name": "a"}}, "weak": {"model": {"name": "b"}}},
}


def side(text: str, finish: str = "stop", tokens: int | None = None, language: str = "python") -> Side:
    """A reply as the checks see it (tokens default to a rough word count)."""
    return Side(text, finish, len(text.split()) if tokens is None else tokens, extract_code(text, language))


def solution(i: int, strong: bool) -> str:
    """A distinct, realistic Python reply for instruction i: the strong one documented and careful."""
    if strong:
        return (
            f"Sure! Here is `scale_{i}`:\n\n```python\n"
            f"def scale_{i}(values: list[float], factor: float = {i % 7 + 2}.0) -> list[float]:\n"
            f'    """Return each value multiplied by the factor, skipping None entries ({i})."""\n'
            f"    if factor == 0:\n"
            f"        raise ValueError('factor must be non-zero')\n"
            f"    return [v * factor for v in values if v is not None]\n```\n"
        )
    return f"```python\ndef s{i}(l):\n    out = []\n    for v in l: out.append(v*{i % 5 + 1})\n    return out\n```\n"


def record(
    doc_id: str,
    strong: list[str],
    weak: list[str],
    *,
    strong_tokens: list[int] | None = None,
    weak_tokens: list[int] | None = None,
    strong_finish: list[str] | None = None,
    weak_finish: list[str] | None = None,
    language: str = "python",
) -> dict[str, Any]:
    """One generate record in the stage's input contract."""

    def samples(texts: list[str], tokens: list[int] | None, finish: list[str] | None) -> list[dict[str, Any]]:
        return [
            {
                "text": text,
                "finish_reason": finish[i] if finish else "stop",
                "tokens": tokens[i] if tokens else len(text.split()),
            }
            for i, text in enumerate(texts)
        ]

    return {
        "id": doc_id,
        "instruction": f"Write the function of {doc_id}.",
        "prompt": f"Implement the following logically and readably.\n\nWrite the function of {doc_id}.",
        "language": language,
        "repo": None,
        "path": f"lib/{doc_id}.py",
        "source_tokens": 100,
        "strong": {"model": "smollm2-135m-instruct", "samples": samples(strong, strong_tokens, strong_finish)},
        "weak": {"model": "smollm2-135m-instruct[prune 13+13]", "samples": samples(weak, weak_tokens, weak_finish)},
    }


def pool(n: int, longer_share: float = 0.5, language: str = "python", prefix: str = "doc") -> list[dict[str, Any]]:
    """n single-sample records whose first round(n * longer_share) have chosen longer (in tokens)."""
    longer = round(n * longer_share)
    return [
        record(
            f"{prefix}{i:04d}",
            [solution(i, strong=True)],
            [solution(i, strong=False)],
            strong_tokens=[120 + i % 13] if i < longer else [40 + i % 5],
            weak_tokens=[60 + i % 11] if i < longer else [90 + i % 9],
            language=language,
        )
        for i in range(n)
    ]


def write_generate(root: Path, records: list[dict[str, Any]], files: int = 1) -> None:
    """Write records round-robin into `files` gzip jsonl shards under WORKDIR/generate/output."""
    out = root / "generate" / "output"
    out.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with gzip.open(out / f"{f:05d}.jsonl.gz", "wt", encoding="utf-8") as handle:
            for rec in records[f::files]:
                handle.write(json.dumps(rec) + "\n")


def make_spec(**pairs: Any) -> Spec:
    """A spec with the upstream sections the pairs stage requires and `pairs` set as given."""
    return Spec.model_validate({**SPEC, "pairs": pairs})


def layout(root: Path) -> RunLayout:
    return RunLayout(root)
