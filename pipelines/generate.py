"""`generate`: a strong model (chosen) and a weak model (rejected) each implement every instruction.

Reads `WORKDIR/describe/output/<shard>.jsonl.gz`; writes `WORKDIR/generate/output/<shard>-<chunk>.jsonl.gz` in the
contract the `pairs` stage reads: `{id, instruction, prompt, language, repo, path, source_tokens,
strong: {model, samples: [{text, finish_reason, tokens}]}, weak: {...}}`. Runs as datatrove tasks on
`generate.executor` (else the top-level executor), each taking whole describe shards. In a task the models run
one after the other (one in memory at a time), chunk by chunk of `chunk_size` instructions; each role has its
own request cache per chunk (`cache/<role>/<shard>-<chunk>.jsonl`), so a crash in the weak model's run keeps
every strong reply, and a chunk's output is written only once both roles finished it.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, ClassVar

from pipelines.costs import GEN_FILL, Flow, StagePlan, gen_plan, model_str, task_wall
from pipelines.shards import chunks, write_shard
from pipelines.spec import GenerateSpec, Spec
from pipelines.stage import RunLayout, TaskStage
from sdk.config import GeneratorSpec, ModelSpec
from sdk.engine import Generator, Request, RequestCache, leave_idle, model_label, open_generator
from sdk.errors import RunError
from sdk.fileio import atomic_write_json

# Markdown fence tags for languages whose name is not its usual tag.
FENCE_TAGS = {"c++": "cpp", "c#": "csharp", "shell": "bash", "objective-c": "objectivec"}


def generation_prompt(template: str, record: dict[str, Any]) -> str:
    language = record.get("language") or "code"
    return template.format(
        instruction=record["instruction"], language=language, language_tag=FENCE_TAGS.get(language, language)
    )


class GenerateStage(TaskStage):
    """The strong and the weak model each answer every instruction (one engine per task, one model at a time)."""

    name = "generate"
    section = "generate"
    reads = ("generate",)
    writes = ("output/*.jsonl.gz (strong + weak responses per instruction)", "cache/ (strong and weak request caches)")
    input_stage = "describe"
    feeds: ClassVar[dict[str, str]] = {"describe": "generate reads WORKDIR/describe: add a `describe` section"}

    @classmethod
    def estimate(cls, spec: Spec, layout: RunLayout, flow: Flow) -> StagePlan:
        cfg = spec.generate
        assert cfg is not None
        outputs = [str(layout.stage_dir(cls.name) / w) for w in cls.writes]
        plan = StagePlan(cls.name, [str(layout.stage_dir("describe") / "output")], outputs, "")
        parts = []
        for role, gen in (("strong", cfg.strong), ("weak", cfg.weak)):
            pt, nt, gpu, cpu, size = gen_plan(flow.docs, flow.instr_tokens, gen)
            plan.input_tokens += int(pt)
            plan.generated_tokens += int(nt)
            plan.gpu_hours += gpu
            plan.cpu_hours += cpu
            parts.append(f"{role} {model_str(gen.model, size)}")
        plan.detail = ", ".join(parts)
        plan.documents = int(flow.docs)
        where = "generate.executor" if cfg.executor is not None else "executor"
        split = "describe parts (~{shards:,}); lower describe.chunk_size"
        task_wall(plan, cls.executor(spec), where, [cfg.strong.model, cfg.weak.model], flow.shards, split)
        flow.response_tokens = (cfg.strong.sampling.max_new_tokens + cfg.weak.sampling.max_new_tokens) / 2 * GEN_FILL
        flow.docs *= min(cfg.strong.sampling.n, cfg.weak.sampling.n)
        return plan

    def first_model(self) -> ModelSpec | None:
        return self.spec.generate.strong.model if self.spec.generate else None

    @property
    def cfg(self) -> GenerateSpec:
        assert self.spec.generate is not None
        return self.spec.generate

    def run_task(self, rank: int, world_size: int) -> None:
        """Strong replies for every unfinished chunk of this task, then weak ones, then each chunk's output:
        one engine at a time, each loaded once per task."""
        shards = [s for s in self.inputs()[rank::world_size] if not self.done_marker(s).is_file()]
        for role, gen in (("strong", self.cfg.strong), ("weak", self.cfg.weak)):
            generator: Generator | None = None
            try:
                for shard in shards:
                    for unit, records in chunks(shard, self.cfg.chunk_size):
                        figures = self.outdir / "cache" / role / f"{unit}.json"
                        if figures.is_file() or (self.outdir / "stats" / f"{unit}.json").is_file():
                            continue
                        generator = generator or open_generator(gen.model)  # the describer's engine when it is the same
                        atomic_write_json(figures, self._reply(generator, role, gen, unit, records))
            finally:
                if generator is not None:
                    leave_idle(generator)
        for shard in shards:
            totals: Counter[str] = Counter()
            for unit, records in chunks(shard, self.cfg.chunk_size):
                stats = self.outdir / "stats" / f"{unit}.json"
                if not stats.is_file():  # written after the chunk's output: the chunk is done
                    atomic_write_json(stats, self._merge(unit, records))
                totals.update(json.loads(stats.read_text()))
            atomic_write_json(self.done_marker(shard), dict(totals))

    def _reply(
        self, generator: Generator, role: str, gen: GeneratorSpec, unit: str, records: list[dict[str, Any]]
    ) -> dict[str, int]:
        """`role`'s replies to one chunk into its request cache; returns the chunk's figures for that role."""
        budget = generator.max_model_len - gen.sampling.max_new_tokens
        requests, cut = [], 0
        for record in records:
            ids, _, truncated = generator.fit(
                lambda text, r=record: generation_prompt(self.cfg.template, {**r, "instruction": text}),
                record["instruction"], budget, self.cfg.use_chat_template,
            )  # fmt: skip
            requests.append(Request(str(record["id"]), ids))
            cut += truncated
        cache = RequestCache(self.outdir / "cache" / role / f"{unit}.jsonl")
        cached = len(cache.load())
        replies = generator.run(requests, gen.sampling, cache, desc=f"{role} {unit} ({generator.label})")
        return {
            f"{role}_resumed_from_cache": cached,
            f"{role}_truncated_prompts": cut,
            f"{role}_tokens": sum(s["tokens"] for samples in replies.values() for s in samples),
        }

    def _merge(self, unit: str, records: list[dict[str, Any]]) -> dict[str, int]:
        """One chunk's output rows (instruction, prompt, both roles' samples); returns the chunk's figures."""
        cfg, figures = self.cfg, Counter({"instructions_in": len(records), "records_out": len(records)})
        replies = {}
        for role in ("strong", "weak"):
            replies[role] = RequestCache(self.outdir / "cache" / role / f"{unit}.jsonl").load()
            figures.update(json.loads((self.outdir / "cache" / role / f"{unit}.json").read_text()))
        out = []
        for record in records:
            rid = str(record["id"])
            row = {k: record.get(k) for k in ("id", "instruction", "language", "repo", "path", "source_tokens")}
            row["prompt"] = generation_prompt(cfg.template, record)
            for role, gen in (("strong", cfg.strong), ("weak", cfg.weak)):
                if rid not in replies[role]:
                    raise RunError(f"generate: the {role} cache of chunk {unit} lacks request {rid}; rerun to redo it")
                row[role] = {"model": model_label(gen.model), "samples": replies[role][rid]}
            out.append(row)
        write_shard(self.outdir / "output" / f"{unit}.jsonl.gz", out)
        return dict(figures)

    def summarize(self, totals: dict[str, Any]) -> dict[str, Any]:
        if not totals.get("instructions_in"):
            raise RunError(f"generate: no instructions in {self.layout.stage_dir('describe') / 'output'}")
        return dict(sorted(totals.items()))
