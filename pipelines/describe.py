"""`describe`: an instruct LLM writes, for each curated file, the instruction that file answers.

Reads `WORKDIR/curate/output/*.jsonl.gz` (datatrove documents) and writes
`WORKDIR/describe/output/part-NNNNN.jsonl.gz`, one record per kept instruction:
`{id, instruction, language, repo, path, source_tokens, truncated, finish_reason}`.

Truncation rule: a file whose prompt would exceed `max_input_tokens` (or the model context minus
`max_new_tokens`) keeps its head, cut back to the last whole line that fits, so the describer sees
the imports and first definitions; such files are counted as `truncated`.
Drop rules: an empty reply; a reply that is a repetition loop; a reply shorter than
`min_instruction_chars` once fenced code blocks are removed (a describer that pastes the code back
would leak the answer into the prompt).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from pipelines.engine import Generator, Request, RequestCache, leave_idle, open_generator
from pipelines.errors import RunError
from pipelines.pairs.checks import is_repetition_loop
from pipelines.shards import read_shards, stage_shards, write_parts
from pipelines.spec import DescribeSpec, ModelSpec
from pipelines.stage import Stage

_FENCE = re.compile(r"```.*?(```|$)", re.DOTALL)
_LEAD = re.compile(r"^\s*(instruction|task)\s*:\s*", re.IGNORECASE)


def clean_instruction(text: str) -> str:
    """Drop pasted code blocks and a leading 'Instruction:' label; keep the describer's words."""
    return _LEAD.sub("", _FENCE.sub("", text)).strip().strip('"').strip()


def drop_reason(instruction: str, raw: str, cfg: DescribeSpec) -> str | None:
    if not raw.strip():
        return "empty"
    if is_repetition_loop(raw, max_line_share=0.5, min_lines=4):
        return "repetition_loop"
    if len(instruction) < cfg.min_instruction_chars:
        return "too_short"
    return None


def fit_code(generator: Generator, cfg: DescribeSpec, doc: dict[str, Any]) -> tuple[list[int], int, bool]:
    """(prompt token ids, source tokens, truncated?) under the prompt budget, by the module's rule."""
    meta = doc.get("metadata") or {}
    fields = {"language": meta.get("language") or "code", "path": meta.get("path") or ""}
    budget = min(cfg.max_input_tokens, generator.max_model_len - cfg.sampling.max_new_tokens)
    return generator.fit(
        lambda code: cfg.template.format(code=code, **fields), doc["text"], budget, cfg.use_chat_template
    )


class DescribeStage(Stage):
    name = "describe"

    def first_model(self) -> ModelSpec | None:
        return self.spec.describe.model if self.spec.describe else None

    def run(self) -> dict[str, Any]:
        cfg = self.spec.describe
        assert cfg is not None
        docs = list(read_shards(stage_shards(self.layout.stage_dir("curate"))))
        if not docs:
            raise RunError(f"describe: no curated documents in {self.layout.stage_dir('curate') / 'output'}")
        generator = open_generator(cfg.model)
        try:
            requests, meta = [], {}
            truncated = 0
            for doc in docs:
                ids, source_tokens, cut = fit_code(generator, cfg, doc)
                truncated += cut
                requests.append(Request(str(doc["id"]), ids))
                meta[str(doc["id"])] = (doc, source_tokens, cut)
            cache = RequestCache(self.outdir / "cache" / "requests.jsonl")
            cached = len(cache.load())
            results = generator.run(requests, cfg.sampling, cache, desc=f"describe ({generator.label})")
        finally:
            leave_idle(generator)  # generate's strong model may be the same spec

        kept, drops = [], Counter()
        for request in requests:
            doc, source_tokens, cut = meta[request.rid]
            sample = results[request.rid][0]
            instruction = clean_instruction(sample["text"])
            reason = drop_reason(instruction, sample["text"], cfg)
            if reason:
                drops[reason] += 1
                continue
            info = doc.get("metadata") or {}
            kept.append(
                {
                    "id": request.rid,
                    "instruction": instruction,
                    "language": info.get("language"),
                    "repo": info.get("repo"),
                    "path": info.get("path"),
                    "source_tokens": source_tokens,
                    "truncated": cut,
                    "finish_reason": sample["finish_reason"],
                }
            )
        if not kept:
            table = ", ".join(f"{k}={v}" for k, v in drops.most_common())
            raise RunError(f"describe: every instruction was dropped ({table}); check describe.model and template")
        write_parts(self.outdir / "output", kept, cfg.chunk_size)
        return {
            "documents_in": len(docs),
            "instructions_out": len(kept),
            "truncated_prompts": truncated,
            "resumed_from_cache": cached,
            **{f"dropped_{k}": v for k, v in sorted(drops.items())},
        }
