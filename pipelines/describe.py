"""`describe`: an instruct LLM writes, for each curated file, the instruction that file answers.

Reads `WORKDIR/curate/output/<shard>.jsonl.gz` (datatrove documents) and writes
`WORKDIR/describe/output/<shard>-<chunk>.jsonl.gz`, one record per kept instruction:
`{id, instruction, language, repo, path, source_tokens, truncated, finish_reason}`.
Runs as datatrove tasks on `describe.executor` (else the top-level executor): each task takes whole curated
shards and streams them in chunks of `chunk_size` documents, each chunk with its own request cache
(`cache/<shard>-<chunk>.jsonl`) and figures (`stats/<shard>-<chunk>.json`, written last: the chunk is done).

Truncation rule: a file whose prompt would exceed `max_input_tokens` (or the model context minus
`max_new_tokens`) keeps its head, cut back to the last whole line that fits, so the describer sees
the imports and first definitions; such files are counted as `truncated`.
Drop rules: an empty reply; a reply that is a repetition loop; a reply shorter than
`min_instruction_chars` once fenced code blocks are removed (a describer that pastes the code back
would leak the answer into the prompt).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, ClassVar

from pipelines.costs import DESCRIBE_KEEP, GEN_FILL, Flow, StagePlan, gen_plan, model_str, task_wall
from pipelines.pairs.checks import is_repetition_loop
from pipelines.shards import chunks, write_shard
from pipelines.spec import DescribeSpec, Spec
from pipelines.stage import RunLayout, TaskStage
from sdk.config import ModelSpec
from sdk.engine import Generator, Request, RequestCache, leave_idle, open_generator
from sdk.errors import RunError
from sdk.fileio import atomic_write_json

_FENCE = re.compile(r"```.*?(```|$)", re.DOTALL)
_LEAD = re.compile(r"^\s*(instruction|task)\s*:\s*", re.IGNORECASE)
HEADLINE = ("documents_in", "instructions_out", "truncated_prompts", "resumed_from_cache")


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


class DescribeStage(TaskStage):
    """The describer LLM writes an instruction for each curated file (one vLLM engine per task)."""

    name = "describe"
    section = "describe"
    reads = ("describe",)
    writes = ("output/*.jsonl.gz (instructions, parts of chunk_size documents)", "cache/ (request caches)")
    input_stage = "curate"
    feeds: ClassVar[dict[str, str]] = {"curate": "describe reads WORKDIR/curate: add a `source` section"}

    @classmethod
    def estimate(cls, spec: Spec, layout: RunLayout, flow: Flow) -> StagePlan:
        cfg = spec.describe
        assert cfg is not None
        each = min(flow.mean_tokens, cfg.max_input_tokens)
        pt, nt, gpu, cpu, size = gen_plan(flow.docs, each, (cfg.model, cfg.sampling))
        plan = StagePlan(
            cls.name,
            [str(layout.stage_dir("curate") / "output")],
            [str(layout.stage_dir(cls.name) / w) for w in cls.writes],
            f"describer {model_str(cfg.model, size)}, {cfg.sampling.max_new_tokens} new tokens max",
            documents=int(flow.docs),
            input_tokens=int(pt),
            generated_tokens=int(nt),
            gpu_hours=gpu,
            cpu_hours=cpu,
        )
        where = "describe.executor" if cfg.executor is not None else "executor"
        split = "curate shards ({shards:,}); raise executor.tasks (curate)"
        task_wall(plan, cls.executor(spec), where, [cfg.model], flow.shards, split)
        flow.instr_tokens = cfg.sampling.max_new_tokens * GEN_FILL
        if flow.shards is not None:  # a part per chunk_size documents of each curate shard
            flow.shards *= max(1, math.ceil(flow.docs / flow.shards / cfg.chunk_size))
        flow.docs *= DESCRIBE_KEEP
        return plan

    def first_model(self) -> ModelSpec | None:
        return self.spec.describe.model if self.spec.describe else None

    def run_task(self, rank: int, world_size: int) -> None:
        generator: Generator | None = None
        try:
            for shard in self.inputs()[rank::world_size]:
                if self.done_marker(shard).is_file():
                    continue
                figures: Counter[str] = Counter()
                for unit, docs in chunks(shard, self.cfg.chunk_size):
                    stats = self.outdir / "stats" / f"{unit}.json"
                    if not stats.is_file():  # written after the chunk's output: the chunk is done
                        generator = generator or open_generator(self.cfg.model)
                        atomic_write_json(stats, self._describe_chunk(generator, unit, docs))
                    figures.update(json.loads(stats.read_text()))
                atomic_write_json(self.done_marker(shard), dict(figures))
        finally:
            if generator is not None:
                leave_idle(generator)  # generate's strong model may be the same spec

    @property
    def cfg(self) -> DescribeSpec:
        assert self.spec.describe is not None
        return self.spec.describe

    def _describe_chunk(self, generator: Generator, unit: str, docs: list[dict[str, Any]]) -> dict[str, int]:
        """Instructions for one chunk of documents, written to output/<unit>.jsonl.gz; returns its figures."""
        cfg = self.cfg
        requests, meta = [], {}
        for doc in docs:
            ids, source_tokens, cut = fit_code(generator, cfg, doc)
            requests.append(Request(str(doc["id"]), ids))
            meta[str(doc["id"])] = (doc, source_tokens, cut)
        cache = RequestCache(self.outdir / "cache" / f"{unit}.jsonl")
        cached = len(cache.load())
        results = generator.run(requests, cfg.sampling, cache, desc=f"describe {unit} ({generator.label})")
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
        write_shard(self.outdir / "output" / f"{unit}.jsonl.gz", kept)
        return {
            "documents_in": len(docs),
            "instructions_out": len(kept),
            "truncated_prompts": sum(m[2] for m in meta.values()),
            "resumed_from_cache": cached,
            **{f"dropped_{k}": v for k, v in sorted(drops.items())},
        }

    def summarize(self, totals: dict[str, Any]) -> dict[str, Any]:
        if not totals.get("documents_in"):
            raise RunError(f"describe: no curated documents in {self.layout.stage_dir('curate') / 'output'}")
        if not totals.get("instructions_out"):
            drops = {k.removeprefix("dropped_"): v for k, v in totals.items() if k.startswith("dropped_")}
            table = ", ".join(f"{k}={v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1]))
            raise RunError(f"describe: every instruction was dropped ({table}); check describe.model and template")
        return {k: totals.get(k, 0) for k in HEADLINE} | dict(sorted(totals.items()))
