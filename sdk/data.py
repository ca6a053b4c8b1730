"""Preference pairs: loading and validation, tokenization with truncation, length-grouped batches, collation.

Sequence layout (the contract `score`, training and plain-transformers users share):

    input_ids = tokenizer(prompt) + tokenizer(response) + [eos]      (no other special tokens)

The reward is read at the appended EOS, so it sees the whole response.

Truncation rule when a pair does not fit `max_length` tokens (EOS included):
  1. The EOS is always kept.
  2. The prompt keeps its *last* tokens (the part the response answers), at most `max(max_length // 2,
     max_length - longest response)` of them, and the same prompt tokens are used for chosen and rejected.
  3. Each response keeps its *last* tokens that fit after the prompt: its end is where the reward is read
     and, for code, where a strong and a weak answer differ most.
Pairs whose chosen and rejected sequences are identical after this (or before it) teach nothing and are
dropped and counted, never trained on.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdk.errors import DataError

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


# --------------------------------------------------------------------------- loading and validation


def load_pairs(pairs: Any, columns: Sequence[str] = PAIR_COLUMNS) -> pa.Table:
    """Read pairs from a path/glob of parquet or jsonl files, a `datasets.Dataset`, or a list of dicts.

    Every source is validated before any work starts: present columns, string cells, at least one row.
    Errors name the file (or "pairs list"), the column and the first offending row.
    """
    if isinstance(pairs, (str, Path)):
        return _load_files(str(pairs), columns)
    if hasattr(pairs, "with_format") and hasattr(pairs, "column_names"):  # datasets.Dataset, not imported here
        return _validate(pairs.with_format("arrow")[:], "dataset", columns)  # honours select/filter/shuffle
    if isinstance(pairs, pa.Table):
        return _validate(pairs, "table", columns)
    if isinstance(pairs, Iterable):
        rows = list(pairs)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"pairs list: row {i} is a {type(row).__name__}, expected a dict with {list(columns)}")
        return _validate(_rows_to_table(rows, "pairs list", columns), "pairs list", columns)
    raise DataError(f"pairs must be a path/glob, a datasets.Dataset or a list of dicts, got {type(pairs).__name__}")


def _load_files(pattern: str, columns: Sequence[str]) -> pa.Table:
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not paths:
        raise DataError(f"no pairs file matches {pattern!r}")
    tables = []
    for path in paths:
        if Path(path).is_dir():
            raise DataError(f"{path}: is a directory; pass a file or a glob such as {path}/*.parquet")
        if not Path(path).exists():
            raise DataError(f"{path}: pairs file not found")
        name = path.removesuffix(".gz")
        if name.endswith(".parquet"):
            try:
                table = pq.read_table(path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
        elif name.endswith((".jsonl", ".json")):
            table = _rows_to_table(_read_jsonl(path), path, columns)
        else:
            raise DataError(f"{path}: unsupported pairs file type (expected .parquet or .jsonl)")
        tables.append(_validate(table, path, columns))
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _read_jsonl(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _rows_to_table(rows: list[dict], source: str, columns: Sequence[str]) -> pa.Table:
    if not rows:
        raise DataError(f"{source}: no pairs (empty)")
    for col in columns:
        for i, row in enumerate(rows):
            if col not in row:
                raise DataError(f"{source}: row {i} has no {col!r} column (columns: {sorted(row)})")
            if not isinstance(row[col], str):
                raise DataError(f"{source}: column {col!r}, row {i}: expected a string, got {type(row[col]).__name__}")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # metadata columns of mixed types
        raise DataError(f"{source}: inconsistent column types ({exc})") from exc


def _validate(table: pa.Table, source: str, columns: Sequence[str]) -> pa.Table:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing} (has {table.column_names})")
    if table.num_rows == 0:
        raise DataError(f"{source}: no pairs (empty)")
    for col in columns:
        arr = table.column(col)
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise DataError(f"{source}: column {col!r} has type {arr.type}, expected strings")
        if arr.null_count:
            row = next(i for i, v in enumerate(arr.to_pylist()) if v is None)
            raise DataError(f"{source}: column {col!r}, row {row}: null, expected a string")
    return table


# --------------------------------------------------------------------------- tokenization


@dataclass
class EncodedPair:
    """Token ids of one pair after truncation; both sequences start with the same `prompt_len` prompt tokens."""

    chosen: list[int]
    rejected: list[int]
    prompt_len: int
    index: int  # row in the source table, for metadata look-ups

    @property
    def length(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class EncodedPairs:
    """Tokenized pairs plus what was dropped or cut on the way, for the run's report."""

    pairs: list[EncodedPair]
    n_input: int
    dropped_identical: int = 0
    truncated: int = 0
    drops: dict[str, int] = field(default_factory=dict)


def fit(prompt: list[int], responses: Sequence[list[int]], eos: int, max_length: int) -> tuple[int, list[list[int]]]:
    """Apply the module's truncation rule; returns (kept prompt length, full sequences with EOS)."""
    longest = max(len(r) for r in responses) + 1
    keep_prompt = (
        len(prompt)
        if len(prompt) + longest <= max_length
        else min(len(prompt), max(max_length // 2, max_length - longest))
    )
    kept = prompt[len(prompt) - keep_prompt :]
    budget = max_length - keep_prompt - 1
    return keep_prompt, [kept + r[max(0, len(r) - budget) :] + [eos] for r in responses]


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def encode_pairs(
    table: pa.Table, tokenizer: Any, max_length: int, drop_identical: bool = True, chunk: int = 4096
) -> EncodedPairs:
    """Tokenize and truncate every pair; for training, drops (and counts) pairs identical after truncation."""
    eos = tokenizer.eos_token_id
    out = EncodedPairs(pairs=[], n_input=table.num_rows)
    for start in range(0, table.num_rows, chunk):
        part = table.slice(start, chunk)
        prompts, chosen, rejected = (_tokenize(tokenizer, part.column(c).to_pylist()) for c in PAIR_COLUMNS)
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True)):
            keep_prompt, (seq_c, seq_r) = fit(p, [c, r], eos, max_length)
            if keep_prompt < len(p) or len(seq_c) < len(p) + len(c) + 1 or len(seq_r) < len(p) + len(r) + 1:
                out.truncated += 1
            if seq_c == seq_r and drop_identical:
                out.dropped_identical += 1
                continue
            out.pairs.append(EncodedPair(seq_c, seq_r, keep_prompt, start + i))
    if out.dropped_identical:
        out.drops["identical_after_truncation"] = out.dropped_identical
    if not out.pairs:
        raise DataError(f"no usable pairs: all {out.n_input} have chosen == rejected after truncation")
    return out


# --------------------------------------------------------------------------- batching


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, mega: int = 64
) -> list[list[int]]:
    """Deterministic micro-batches of similar lengths (less padding), in shuffled order.

    Indices are shuffled with (seed, epoch), cut into mega-batches of `mega * batch_size`, each sorted by
    length and split into micro-batches, whose order is shuffled again. The same arguments always give the
    same batches, which is what makes resuming at an exact sample possible. The last partial batch is kept.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = mega * batch_size
    for i in range(0, len(order), span):
        group = sorted(order[i : i + span], key=lambda j: lengths[j], reverse=True)
        batches.extend(group[k : k + batch_size] for k in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: Sequence[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Inference batches: indices sorted by length, each batch bounded by padded tokens and size."""
    order = sorted(range(len(lengths)), key=lambda j: lengths[j], reverse=True)
    batches: list[list[int]] = []
    for j in order:
        if batches and len(batches[-1]) < max_batch and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(j)
        else:
            batches.append([j])
    return batches


def pad(seqs: Sequence[list[int]], pad_id: int, side: str = "right") -> tuple[list[list[int]], list[list[int]]]:
    """Pad to the longest sequence; returns (ids, attention mask)."""
    width = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        fill = width - len(s)
        ids.append(s + [pad_id] * fill if side == "right" else [pad_id] * fill + s)
        mask.append([1] * len(s) + [0] * fill if side == "right" else [0] * fill + [1] * len(s))
    return ids, mask


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int, side: str = "right") -> dict[str, Any]:
    """One tensor batch for one forward: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}].

    `lm_labels` covers the chosen rows only: response tokens (and EOS) labelled, prompt and padding -100.
    """
    import torch

    from sdk.losses import IGNORE_INDEX

    ids, mask = pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, side)
    labels = []
    for row, p in zip(ids[: len(pairs)], pairs, strict=True):
        start = len(row) - len(p.chosen) if side == "left" else 0
        labels.append(
            [tok if start + p.prompt_len <= k < start + len(p.chosen) else IGNORE_INDEX for k, tok in enumerate(row)]
        )
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "lm_labels": torch.tensor(labels),
        "n_tokens": sum(len(p.chosen) + len(p.rejected) for p in pairs),
    }


def steps_for(n_batches: int, grad_accum: int, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over `n_batches` micro-batches per process."""
    return max(1, math.ceil(n_batches * epochs / grad_accum))
