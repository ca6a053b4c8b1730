"""`generate`: a strong model (chosen) and a weak model (rejected) each implement every instruction.

Reads `WORKDIR/describe/output/*.jsonl.gz`; writes `WORKDIR/generate/output/part-NNNNN.jsonl.gz` in the
contract the `pairs` stage reads: `{id, instruction, prompt, language, repo, path, source_tokens,
strong: {model, samples: [{text, finish_reason, tokens}]}, weak: {...}}`. The models run one after
the other (one in memory at a time); each has its own request cache, so a crash in the weak model's
run keeps every strong reply.
"""

from __future__ import annotations

from typing import Any

from pipelines.engine import Request, RequestCache, leave_idle, model_label, open_generator
from pipelines.errors import RunError
from pipelines.shards import read_shards, stage_shards, write_parts
from pipelines.spec import ModelSpec
from pipelines.stage import Stage

# Markdown fence tags for languages whose name is not its usual tag.
FENCE_TAGS = {"c++": "cpp", "c#": "csharp", "shell": "bash", "objective-c": "objectivec"}


def generation_prompt(template: str, record: dict[str, Any]) -> str:
    language = record.get("language") or "code"
    return template.format(
        instruction=record["instruction"], language=language, language_tag=FENCE_TAGS.get(language, language)
    )


class GenerateStage(Stage):
    name = "generate"

    def first_model(self) -> ModelSpec | None:
        return self.spec.generate.strong.model if self.spec.generate else None

    def run(self) -> dict[str, Any]:
        cfg = self.spec.generate
        assert cfg is not None
        records = list(read_shards(stage_shards(self.layout.stage_dir("describe"))))
        if not records:
            raise RunError(f"generate: no instructions in {self.layout.stage_dir('describe') / 'output'}")
        by_id = {str(r["id"]): r for r in records}
        prompts = {rid: generation_prompt(cfg.template, r) for rid, r in by_id.items()}
        replies: dict[str, dict[str, list[dict[str, Any]]]] = {}
        summary: dict[str, Any] = {"instructions_in": len(records)}
        for role, gen in (("strong", cfg.strong), ("weak", cfg.weak)):
            cache = RequestCache(self.outdir / "cache" / f"{role}.jsonl")
            summary[f"{role}_resumed_from_cache"] = len(cache.load())
            generator = open_generator(gen.model)  # the describer's engine when it is the same spec
            try:
                budget = generator.max_model_len - gen.sampling.max_new_tokens
                requests, cut = [], 0
                for rid, record in by_id.items():
                    ids, _, truncated = generator.fit(
                        lambda text, r=record: generation_prompt(cfg.template, {**r, "instruction": text}),
                        record["instruction"], budget, cfg.use_chat_template,
                    )  # fmt: skip
                    requests.append(Request(rid, ids))
                    cut += truncated
                replies[role] = generator.run(requests, gen.sampling, cache, desc=f"{role} ({generator.label})")
            finally:
                leave_idle(generator)
            summary[f"{role}_truncated_prompts"] = cut
            summary[f"{role}_tokens"] = sum(s["tokens"] for samples in replies[role].values() for s in samples)
        out = []
        for record in records:
            rid = str(record["id"])
            row = {k: record.get(k) for k in ("id", "instruction", "language", "repo", "path", "source_tokens")}
            row["prompt"] = prompts[rid]
            for role, gen in (("strong", cfg.strong), ("weak", cfg.weak)):
                row[role] = {"model": model_label(gen.model), "samples": replies[role][rid]}
            out.append(row)
        write_parts(self.outdir / "output", out, cfg.chunk_size)
        summary["records_out"] = len(out)
        return summary
