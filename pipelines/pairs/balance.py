"""Deterministic balancing of the checked pairs: language quotas, length bias, heldout split, shuffle.

Every choice is a function of pair ids (and the seed), never of input order or of the other pairs'
presence where that can be avoided: the heldout split hashes the id alone, so a pair keeps its split
when pairs are added; subsampling keeps the pairs whose seeded id hash ranks lowest.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sdk.errors import RunError

Row = dict[str, Any]


def unit_hash(key: str) -> float:
    """A stable uniform number in [0, 1) for a string (sha256; Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _rank(rows: Sequence[Row], seed: int) -> list[Row]:
    return sorted(rows, key=lambda row: (unit_hash(f"{seed}:{row['id']}"), row["id"]))


def is_heldout(pair_id: str, fraction: float) -> bool:
    """The split of a pair depends on its id only: adding pairs never moves one between train and heldout."""
    return unit_hash(f"heldout:{pair_id}") < fraction


def length_bias(rows: Sequence[Row]) -> float | None:
    """Share of pairs whose chosen reply is longer (in tokens) than the rejected one: what a reward model
    that only measures length would score. None for no pairs."""
    if not rows:
        return None
    return sum(row["chosen_tokens"] > row["rejected_tokens"] for row in rows) / len(rows)


def apply_language_quotas(rows: list[Row], quotas: dict[str, float] | None, seed: int) -> tuple[list[Row], list[Row]]:
    """Cap each listed language at its share of the pairs kept; (kept, dropped).

    Capping one language shrinks the total, which tightens every cap, so the caps are iterated to their
    fixed point (counts only fall, so it ends). Languages not listed are never cut. When every language present
    is capped and the caps sum below 1, no subset meets them: that is an error rather than zero pairs.
    """
    if not quotas:
        return rows, []
    counts = Counter(row["language"] for row in rows)
    capped = {lang: quotas[lang] for lang in counts if lang in quotas}
    if not capped:
        return rows, []
    if len(capped) == len(counts) and sum(capped.values()) < 1:
        shares = ", ".join(f"{lang}={share}" for lang, share in sorted(capped.items()))
        raise RunError(
            f"pairs.balance.language_quotas caps every language present ({shares}) and the caps sum below 1: "
            "no set of pairs meets them; raise a quota or add pairs of another language"
        )
    keep = dict(counts)
    while True:
        total = sum(keep.values())
        new = {lang: min(keep[lang], int(share * total + 1e-9)) for lang, share in capped.items()}
        if all(new[lang] == keep[lang] for lang in capped):
            break
        keep.update(new)
    kept: list[Row] = []
    dropped: list[Row] = []
    by_language: dict[Any, list[Row]] = {}
    for row in rows:
        by_language.setdefault(row["language"], []).append(row)
    for lang, group in by_language.items():
        ranked = _rank(group, seed)
        kept.extend(ranked[: keep[lang]])
        dropped.extend(ranked[keep[lang] :])
    return kept, dropped


def rebalance_length(rows: list[Row], target: float | None, tolerance: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Subsample the over-represented side until share(chosen longer) is within target ± tolerance.

    It stops at the near edge of the band, which keeps the most pairs; the pairs cut are those whose seeded id
    hash ranks last. `target=None` keeps everything. (kept, dropped).
    """
    share = length_bias(rows)
    if target is None or share is None:
        return rows, []
    low, high = max(0.0, target - tolerance), min(1.0, target + tolerance)
    longer = [row for row in rows if row["chosen_tokens"] > row["rejected_tokens"]]
    others = [row for row in rows if row["chosen_tokens"] <= row["rejected_tokens"]]
    if share > high:
        # keep k of `longer`: k / (k + others) <= high
        keep = int(high * len(others) / (1 - high) + 1e-9)
        ranked = _rank(longer, seed)
        cut = ranked[keep:]
        kept_ids = {row["id"] for row in ranked[:keep]} | {row["id"] for row in others}
    elif share < low:
        # keep m of `others`: longer / (longer + m) >= low
        keep = int(len(longer) * (1 - low) / low + 1e-9)  # low > 0 here: share < low
        ranked = _rank(others, seed)
        cut = ranked[keep:]
        kept_ids = {row["id"] for row in ranked[:keep]} | {row["id"] for row in longer}
    else:
        return rows, []
    return [row for row in rows if row["id"] in kept_ids], cut


def shuffled(rows: Sequence[Row], seed: int) -> list[Row]:
    """A seeded shuffle of rows put in id order first, so the result does not depend on input order."""
    out = sorted(rows, key=lambda row: row["id"])
    random.Random(seed).shuffle(out)
    return out
