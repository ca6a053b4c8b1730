"""The training loop: one readable pass over `deepspeed.initialize`, nanoGPT style (no HF Trainer).

Layout of `output_dir`:
    checkpoints/step-NNNNNNN/   DeepSpeed checkpoint (model, optimizer, scheduler) + trainer_state.json
    checkpoints/latest          written by DeepSpeed after a checkpoint is complete: resume reads it
    ladder/step-NNNNNNN/        HF model dirs at the x2^(1/4) step ladder (scaling curves), when asked
    final/                      HF model dir (`RewardModel.save_pretrained`), written last
    metrics.jsonl               one line per optimizer step (all processes reduced)
    data_summary.json           pairs in / used, drops by reason, truncations
    codepmp-train.json          marker written first: the dir is a codepmp training dir (DESIGN.md §6c)

`output_dir` must be new, empty, a codepmp training dir (a rerun resumes there) or a stage dir of `codepmp run`
(it holds the runner's `_stage.json`); anything else is refused before any work, unless `overwrite=True`:
then the entries above are written beside the other files, which stay untouched.

Resuming is exact: the micro-batch order is a pure function of (seed, epoch, batch size), so a restart at
step s skips the first s * grad_accum micro-batches of that order and sees the same samples next.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from sdk.config import TrainConfig
from sdk.data import EncodedPair, EncodedPairs, length_grouped_batches, load_pairs, steps_for
from sdk.errors import DataError, RunError
from sdk.fileio import atomic_write_json, atomic_write_text
from sdk.losses import reward_model_loss

if TYPE_CHECKING:
    from sdk.model import RewardModel

TRAIN_MARKER = "codepmp-train.json"
STAGE_RECORD = "_stage.json"  # `pipelines.stage.RECORD`: the runner made the dir and guards it
OUTPUTS = ("checkpoints", "ladder", "final", "metrics.jsonl", "data_summary.json", TRAIN_MARKER)


class TrainingDiverged(RunError):
    """The loss or gradient norm became NaN/inf; nothing was saved after the last good checkpoint."""


@dataclass
class TrainResult:
    """What a run produced: where, how far, and the per-step metrics (rank 0's reduced view)."""

    output_dir: Path
    final_dir: Path
    steps: int
    resumed_from: int | None
    pairs: int
    dropped_identical: int
    truncated: int
    history: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float = 0.0


# --------------------------------------------------------------------------- distributed set-up


def setup_distributed() -> tuple[int, int, bool]:
    """Join (or create) the process group; returns (rank, world size, whether this call created it).

    Without a launcher there are no rank variables: a single process sets them itself. On a CPU-only
    machine DeepSpeed must be told to use its CPU accelerator, and collectives go over gloo.
    """
    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ.get("WORLD_SIZE", "1") == "1":
        # Alone, the store needs no port anyone else knows: the OS picks a free one as it binds. A port probed
        # free and then released was taken by another process before a later training's store bound it.
        os.environ.setdefault("MASTER_PORT", "0")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    import deepspeed

    created = not dist.is_initialized()
    if created:
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", verbose=False)
    return dist.get_rank(), dist.get_world_size(), created


# --------------------------------------------------------------------------- schedule and steps


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based) of `total`.

    Linear warmup, then cosine to `min_lr_ratio`, or warmup-stable-decay (flat, then linear decay over the
    last `decay_ratio` of steps, the paper's PMP schedule), or constant.
    """
    step = min(step, total - 1)  # the scheduler is stepped once more after the last update
    warmup = round(cfg.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup - 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay = round(cfg.decay_ratio * total)
        if decay == 0 or step < total - decay:
            return 1.0
        progress = (step - (total - decay) + 1) / decay
        return floor + (1 - floor) * (1 - progress)
    return 1.0


def ladder_steps(total: int) -> set[int]:
    """Steps growing by x2^(1/4) (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16, ...), up to `total`."""
    steps, k = set(), 0
    while (s := round(2 ** (k / 4))) <= total:
        steps.add(s)
        k += 1
    return steps


# --------------------------------------------------------------------------- model preparation


def _blocks(backbone: nn.Module) -> nn.ModuleList:
    lists = [m for m in backbone.children() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise DataError(f"{type(backbone).__name__}: no list of transformer blocks found for trainable_layers")
    return max(lists, key=len)


def freeze_below(module: nn.Module, trainable_layers: int) -> None:
    """Train only the top `trainable_layers` blocks, the final norm and the heads.

    A tied LM head is the input embedding matrix, which sits at the bottom: it stays frozen too. Autograd
    then stops at the lowest trainable block, which is what makes this cheap.
    """
    backbone = module.backbone
    blocks = _blocks(backbone)
    if trainable_layers > len(blocks):
        raise DataError(f"trainable_layers={trainable_layers} but the model has {len(blocks)} blocks")
    embed = backbone.get_input_embeddings()
    for p in module.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[len(blocks) - trainable_layers :]:
        block.requires_grad_(True)
    for child in backbone.children():
        if child is not blocks and child is not embed:
            child.requires_grad_(True)  # final norm (rotary embeddings have no parameters)
    module.classifier.score.requires_grad_(True)
    if module.lm_head is not None and module.lm_head.weight is not embed.weight:
        module.lm_head.requires_grad_(True)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not biases or norm gains (1-D)."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fingerprint(rm: RewardModel) -> str:
    """Identity of the architecture (parameter names and shapes): a checkpoint only fits the same one."""
    shapes = sorted((n, tuple(p.shape)) for n, p in rm.module.state_dict().items())
    return hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]


def native_bf16() -> bool:
    """Whether this machine computes in bf16 natively: a GPU that supports it, or a CPU with AVX512-BF16/AMX.

    Elsewhere PyTorch emulates bf16 matmuls: on a 2-core AMD EPYC Zen 3 (AVX2 only) benchmarks/bench_train.py took
    31 min in bf16 and 170 s in fp32 (same steps), so "auto" precision trains in fp32 there.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no cheap way to tell, and fp32 is never slow by emulation
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """The precision a TrainConfig trains in here: "auto" becomes bf16 or fp32 (`native_bf16`)."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16() else "fp32"


def ds_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config implied by a TrainConfig (one pair = one DeepSpeed "sample")."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    precision = resolve_precision(cfg.precision)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_pairs,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_pairs * cfg.grad_accum_steps * world,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam needs compiled ops
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------- the output directory


def claim_output_dir(out: Path, overwrite: bool) -> None:
    """Check `out` may hold this run's outputs, then mark it as a codepmp training dir; before any work, so a
    refusal costs nothing and a run never ends in an export it may not write.

    Every process of a run calls this on the same dir: the marker's temp file (another process writing it)
    does not count as a stranger's file, and writing the marker twice gives the same file.
    """
    from sdk.model import _check_writable, check_not_precious, check_save_dir

    check_not_precious(out, "train")
    if out.exists() and not out.is_dir():
        raise DataError(f"train: output dir {out} is a file, not a directory")
    _check_writable(out)
    names = sorted(
        p.name for p in out.iterdir() if not (p.name.startswith(f".{TRAIN_MARKER}.") and p.name.endswith(".tmp"))
    )
    if names and TRAIN_MARKER not in names and STAGE_RECORD not in names and not overwrite:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise DataError(
            f"train: output dir {out} is not empty and not a codepmp training dir (holds {shown}); use a new or "
            "empty directory, or pass overwrite=True to write codepmp's outputs beside those files"
        )
    for export in [out / "final", *sorted((out / "ladder").glob("step-*"))]:  # replaced at the end of training
        check_save_dir(export, overwrite)
    if TRAIN_MARKER not in names:
        atomic_write_json(out / TRAIN_MARKER, {"written_by": "codepmp", "outputs": list(OUTPUTS)})


# --------------------------------------------------------------------------- the loop


def train(
    rm: RewardModel,
    pairs: Any,
    output_dir: str | os.PathLike,
    cfg: TrainConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train `rm` in place on `pairs`; resumes from `output_dir/checkpoints/latest` when present.

    `on_step(step, metrics)` runs on every process after each optimizer step (logging hooks, tests).
    `overwrite=True` lets a directory holding other files be used (see the module docstring).
    """
    out = Path(output_dir)
    if cfg.lm_coef > 0 and rm.module.lm_head is None:
        raise DataError(f"{rm.source} has no LM head (untied and not in the checkpoint): set lm_coef=0")
    claim_output_dir(out, overwrite)

    encoded = rm.encode(load_pairs(pairs), cfg.max_length_tokens)
    rank, world, created_group = setup_distributed()
    try:
        return _train_in_group(rm, encoded, out, cfg, rank, world, on_step, overwrite)
    finally:
        if created_group and world == 1:
            # Leave the process as found, even after an error: while a group is live, the next vLLM engine must
            # run in its own process (`sdk.engine.set_engine_process`), which on CPU starts 3x slower and
            # generates 1.6x slower. DeepSpeed's call also drops the groups it cached, which torch's leaves stale.
            import deepspeed

            deepspeed.comm.destroy_process_group()


def _train_in_group(
    rm: RewardModel,
    encoded: EncodedPairs,
    out: Path,
    cfg: TrainConfig,
    rank: int,
    world: int,
    on_step: Callable[[int, dict[str, float]], None] | None,
    overwrite: bool,
) -> TrainResult:
    """The loop proper, inside the process group `train` set up."""
    import deepspeed
    from tqdm.auto import tqdm

    ckpt_dir = out / "checkpoints"
    data = encoded.pairs
    torch.manual_seed(cfg.seed)
    module = rm.module
    if cfg.trainable_layers is not None:
        freeze_below(module, cfg.trainable_layers)
    else:
        module.requires_grad_(True)
    if cfg.gradient_checkpointing:
        module.classifier.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    lengths = [p.length for p in data]
    per_rank = len(length_grouped_batches(lengths, cfg.micro_batch_pairs, cfg.seed, 0)) // world
    if per_rank == 0:
        raise DataError(f"{len(data)} pairs are fewer than {world} processes x micro_batch_pairs")
    total = cfg.max_steps or steps_for(per_rank, cfg.grad_accum_steps, cfg.epochs)

    model_id = fingerprint(rm)  # before DeepSpeed: ZeRO-3 partitions the parameters in place
    # fused: one kernel over all tensors; on CPU ~8x faster per step than the for-each default for 135M params
    optimizer = torch.optim.AdamW(
        param_groups(module, cfg.weight_decay), lr=cfg.learning_rate, betas=cfg.adam_betas, fused=True
    )
    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg)),
        config=ds_config(cfg, world),
    )

    state = {
        "fingerprint": model_id,
        "data": {"pairs": len(data), "tokens": sum(lengths), "seed": cfg.seed, "world": world,
                 "micro_batch_pairs": cfg.micro_batch_pairs, "grad_accum_steps": cfg.grad_accum_steps,
                 "max_length_tokens": cfg.max_length_tokens},
    }  # fmt: skip
    start, last_good, samples_seen = _resume(engine, ckpt_dir, state)
    metrics_path = out / "metrics.jsonl"
    history = _load_history(metrics_path, start) if start else []
    if rank == 0:
        _write_lines(metrics_path, history)

    save_at = ladder_steps(total) if cfg.ladder_checkpoints else set()
    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batch(m: int) -> list[EncodedPair]:
        """The m-th micro-batch of this process in the run's fixed order."""
        epoch, pos = divmod(m, per_rank)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = length_grouped_batches(lengths, cfg.micro_batch_pairs, cfg.seed, epoch)
        return [data[i] for i in epoch_cache[epoch][pos * world + rank]]

    if rank == 0:
        summary = {
            "pairs_in": encoded.n_input,
            "pairs_used": len(data),
            "dropped": encoded.drops,
            "truncated": encoded.truncated,
            "steps": total,
            "resumed_from": start or None,
            "world_size": world,
            "precision": resolve_precision(cfg.precision),
        }
        atomic_write_text(out / "data_summary.json", json.dumps(summary, indent=2))
        tqdm.write(f"pairs: {len(data)} of {encoded.n_input} used, {encoded.dropped_identical} identical after "
                   f"truncation dropped, {encoded.truncated} truncated; {total} steps from step {start}, "
                   f"{summary['precision']}")  # fmt: skip
    module.train()
    bar = tqdm(total=total, initial=start, disable=rank != 0, desc="train", unit="step", dynamic_ncols=True)
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        # summed over micro-batches and processes: loss, ranking, lm, correct pairs, pairs, tokens
        sums = torch.zeros(6, dtype=torch.float64)
        for a in range(cfg.grad_accum_steps):
            batch = rm.collate(micro_batch(step * cfg.grad_accum_steps + a))
            n = batch["lm_labels"].shape[0]
            rewards, lm = engine(
                batch["input_ids"].to(engine.device),
                batch["attention_mask"].to(engine.device),
                batch["lm_labels"].to(engine.device) if cfg.lm_coef > 0 else None,
            )
            loss = reward_model_loss(
                rewards[:n], rewards[n:], lm, rm_coef=cfg.rm_coef, lm_coef=cfg.lm_coef, margin=cfg.margin
            )
            _stop_if_not_finite(loss.total.detach(), "loss", step, last_good)
            engine.backward(loss.total)
            engine.step()
            sums += torch.tensor(
                [
                    loss.total.item(),
                    loss.ranking.item(),
                    loss.lm.item(),
                    loss.accuracy.item() * n,
                    n,
                    batch["n_tokens"],
                ],
                dtype=torch.float64,
            )
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and cfg.precision != "fp16":  # fp16 overflow steps are skipped, not fatal
            _stop_if_not_finite(torch.as_tensor(float(grad_norm)), "gradient norm", step, last_good)
        dist.all_reduce(sums)
        elapsed = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "loss": sums[0].item() / (cfg.grad_accum_steps * world),
            "ranking": sums[1].item() / (cfg.grad_accum_steps * world),
            "lm": sums[2].item() / (cfg.grad_accum_steps * world),
            "accuracy": sums[3].item() / sums[4].item(),
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": sums[5].item(),
            "tokens_per_s": sums[5].item() / elapsed,
            "samples_seen": samples_seen + sums[4].item(),
        }
        samples_seen = row["samples_seen"]
        history.append(row)
        if rank == 0:
            _write_lines(metrics_path, [row], append=True)
        if (step + 1) % cfg.log_every_steps == 0 or step + 1 == total:
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if cfg.save_every_steps and (step + 1) % cfg.save_every_steps == 0 and step + 1 < total:
            last_good = _save_checkpoint(
                engine, ckpt_dir, step + 1, {**state, "step": step + 1, "samples_seen": row["samples_seen"]}, rank
            )
        if step + 1 in save_at:
            _export(rm, engine, out / "ladder" / f"step-{step + 1:07d}", cfg, rank, overwrite)
        if on_step is not None:
            on_step(step + 1, row)
    bar.close()

    final = out / "final"
    _export(rm, engine, final, cfg, rank, overwrite)
    engine.destroy()  # removes DeepSpeed's gradient hooks, so the model can be trained again (pretrain -> finetune)
    module.zero_grad(set_to_none=True)
    if cfg.zero_stage == 3:  # parameters stay partitioned after ZeRO-3: reload the gathered weights
        from sdk.model import RewardModel

        rm.module = RewardModel.from_pretrained(final).module
    if cfg.gradient_checkpointing:
        rm.module.classifier.gradient_checkpointing_disable()
    rm.module.eval()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return TrainResult(
        out, final, total, start or None, len(data), encoded.dropped_identical, encoded.truncated, history, peak
    )


def _stop_if_not_finite(value: torch.Tensor, what: str, step: int, last_good: Path | None) -> None:
    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0])
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every process stops together, none hangs in a collective
    if bad.item():
        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written before it"
        raise TrainingDiverged(
            f"{what} became {value.item() if value.numel() == 1 else 'non-finite'} at step {step + 1}; "
            f"stopped without saving ({where}). Lower learning_rate or check the data."
        )


def _save_checkpoint(engine: Any, ckpt_dir: Path, step: int, state: dict[str, Any], rank: int) -> Path:
    """DeepSpeed checkpoint; `trainer_state.json` goes in first, and DeepSpeed writes `latest` last."""
    tag = f"step-{step:07d}"
    if rank == 0:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        atomic_write_text(ckpt_dir / tag / "trainer_state.json", json.dumps(state, indent=2))
    engine.save_checkpoint(str(ckpt_dir), tag=tag)
    return ckpt_dir / tag


def _resume(engine: Any, ckpt_dir: Path, state: dict[str, Any]) -> tuple[int, Path | None, float]:
    """Load the checkpoint named by `latest`, after checking that it belongs to this model and data.

    Returns (optimizer steps done, checkpoint dir, pairs seen by all processes).
    """
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return 0, None, 0.0
    tag_dir = ckpt_dir / latest.read_text().strip()
    try:
        saved = json.loads((tag_dir / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"checkpoint {tag_dir} has no readable trainer_state.json: {exc}") from exc
    if saved.get("fingerprint") != state["fingerprint"]:
        raise DataError(
            f"checkpoint {tag_dir} was written for another model (parameter fingerprint "
            f"{saved.get('fingerprint')} != {state['fingerprint']}); use a fresh output_dir"
        )
    if saved.get("data") != state["data"]:
        raise DataError(
            f"checkpoint {tag_dir} was trained on other data or batching ({saved.get('data')} != {state['data']}): "
            "resuming would not continue the same run; use a fresh output_dir"
        )
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag_dir.name)
    if load_path is None:
        raise DataError(f"DeepSpeed could not load checkpoint {tag_dir}")
    return saved["step"], tag_dir, saved["samples_seen"]


def _export(rm: RewardModel, engine: Any, directory: Path, cfg: TrainConfig, rank: int, overwrite: bool) -> None:
    """HF model dir from rank 0 (ZeRO-3 shards are gathered first)."""
    if cfg.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            if rank == 0:
                rm.save_pretrained(directory, overwrite=overwrite)
    elif rank == 0:
        rm.save_pretrained(directory, overwrite=overwrite)
    dist.barrier()


def _load_history(path: Path, upto: int) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _write_lines(path: Path, rows: list[dict[str, Any]], append: bool = False) -> None:
    if append:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
