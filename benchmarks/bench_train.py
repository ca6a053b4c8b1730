"""Training throughput: our DeepSpeed loop vs TRL `RewardTrainer`, same model, data, batch and length.

Run (about 6-8 minutes on 2 CPU cores):

    DS_ACCELERATOR=cpu .venv/bin/python -m pytest benchmarks/bench_train.py -s --benchmark-only

Each trainer runs in its own process (so peak RSS is its own) on the bundled SmolLM2-135M-Instruct
(`resolve_model`), in the precision `"auto"` picks here (bf16 where the CPU has AVX512-BF16/AMX, else fp32:
`sdk.train.resolve_precision`), full fine-tuning, ranking loss only (TRL has no LM term), AdamW, no gradient
checkpointing, the same real code pairs (functions of the Python stdlib vs a degraded copy) of at most
MAX_LEN tokens (TRL drops longer ones; ours would truncate: none are longer). Throughput counts real
(non-padding) tokens per second of each step 2..N (step 1 pays one-off warm-up). Each variant uses its
trainer's defaults for batching: ours groups pairs of similar length, TRL samples at random; TRL with its
`group_by_length` sampler (grouping by chosen length) is measured too, as the strongest like-for-like
baseline. On a shared machine wall time depends on the neighbours' load, so tokens per CPU-second of the
process (same thread count for all) are reported next to tokens per wall-second.

`python benchmarks/bench_train.py --trainer ours|trl|trl-grouped` runs one variant and prints JSON.

Measured 2026-11-25 (2 vCPU AMD EPYC, torch 2.13 CPU, trl 1.16, 2 interleaved rounds x 5 timed steps, 4 pairs
of <= 192 tokens per step, machine otherwise idle): median step tokens/s ours 303, TRL 189 (1.61x),
TRL+group_by_length 269 (1.13x); peak RSS ours 4.7 GB, TRL 3.1 GB (DeepSpeed's bf16 optimizer keeps bf16
weights and grads next to fp32 master weights and grads). Under neighbours' load the same command gave
anywhere from 0.7x to 14x: compare only runs taken on a quiet machine. MFU above 100 % against DESIGN.md's
188 GFLOP/s means that figure understates this CPU's bf16 peak (and 6N counts the tied embedding matrix,
which costs no matmul FLOPs when the LM head is unused).

Measured 2026-12-03 in a fresh-clone CI run (2 vCPU AMD EPYC Zen 3, no AVX-512, so fp32; CI size: 1 round x 3
steps): median step tokens/s ours 90, TRL 68 (1.33x), TRL+group_by_length 105 (0.86x); the suite took 170 s, where
bf16 (emulated on this CPU) had taken 31 min.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
PAIRS, MICRO_BATCH, MAX_LEN, STEPS, LR = 256, 4, 192, int(os.environ.get("BENCH_STEPS", 6)), 1e-5
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 2))
VARIANTS = ("ours", "trl", "trl-grouped")
PEAK_FLOPS = {"bf16": 188e9, "fp32": 78e9}  # DESIGN.md §6: 2-thread matmul peaks (AVX-512 CPU)


def stdlib_pairs(n: int, tokenizer, max_len: int, seed: int = 0) -> list[dict]:
    """Real code of varied length: chosen = a stdlib function, rejected = it with its body lines shuffled."""
    rng = random.Random(seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng.shuffle(files)
    rows: list[dict] = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            code = ast.get_source_segment(source, node) or ""
            lines = code.splitlines()
            if len(lines) < 3:
                continue
            body = lines[1:]
            rng.shuffle(body)
            prompt = f"# Write the function `{node.name}` from {path.stem}.\n"
            row = {"prompt": prompt, "chosen": code + "\n", "rejected": "\n".join([lines[0], *body]) + "\n"}
            if row["chosen"] == row["rejected"]:
                continue
            longest = max(len(tokenizer(prompt + row[k])["input_ids"]) + 1 for k in ("chosen", "rejected"))
            if longest <= max_len:
                rows.append(row)
            if len(rows) == n:
                return rows
    return rows


def run_ours(model_dir: str, rows: list[dict], out: Path, precision: str) -> dict:
    from sdk import RewardModel
    from sdk.config import TrainConfig
    from sdk.model import finetune_defaults
    from sdk.train import train

    rm = RewardModel.from_pretrained(model_dir)
    settings = {"max_steps": STEPS, "micro_batch_pairs": MICRO_BATCH, "grad_accum_steps": 1, "zero_stage": 0,
                "max_length_tokens": MAX_LEN, "precision": precision, "learning_rate": LR,
                "warmup_ratio": 0.0, "schedule": "constant", "weight_decay": 0.0}  # fmt: skip
    cfg = TrainConfig(**{**finetune_defaults(), **settings})
    marks: list[tuple[float, float, float]] = []
    total = [0.0]

    def on_step(step: int, row: dict) -> None:
        total[0] += row["tokens"]
        marks.append((time.perf_counter(), time.process_time(), total[0]))

    result = train(rm, rows, out, cfg, on_step=on_step)
    params = sum(p.numel() for p in rm.module.classifier.parameters())
    return {**_span(marks), "params": params, "loss": [r["loss"] for r in result.history]}


def _span(marks: list[tuple[float, float, float]]) -> dict:
    """Tokens and wall / CPU seconds from the end of step 1 to the end of the last step."""
    (w0, c0, n0), (w1, c1, n1) = marks[0], marks[-1]
    rates = [(b[2] - a[2]) / (b[0] - a[0]) for a, b in itertools.pairwise(marks)]
    return {"tokens": n1 - n0, "seconds": w1 - w0, "cpu_seconds": c1 - c0, "step_tokens_per_s": rates}


def run_trl(model_dir: str, rows: list[dict], out: Path, precision: str, grouped: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    if tokenizer.pad_token_id in (None, tokenizer.eos_token_id):  # same rule as ours: pad distinct from EOS
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(tokenizer.unk_token_id or 0)
    model.config.pad_token_id = tokenizer.pad_token_id
    marks: list[tuple[float, float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), time.process_time(), trainer._total_train_tokens))

    args = RewardConfig(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=1,
        max_length=MAX_LEN, bf16=precision == "bf16", learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        train_sampling_strategy="group_by_length" if grouped else "random", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    if grouped:  # its LengthGroupedSampler reads `model_input_names[0]`, absent from TRL's pair columns
        tokenizer.model_input_names = ["chosen_ids", *tokenizer.model_input_names[1:]]
    trainer.add_callback(Clock())
    trainer.train()
    return {**_span(marks), "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=["ours", "trl", "trl-grouped"], required=True)
    variant = parser.parse_args().trainer
    import torch
    from transformers import AutoTokenizer

    from sdk.models import resolve_model
    from sdk.train import resolve_precision

    precision = resolve_precision("auto")  # one choice for every trainer: the comparison is like for like
    model_dir = resolve_model(MODEL)
    rows = stdlib_pairs(PAIRS, AutoTokenizer.from_pretrained(model_dir), MAX_LEN)
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "ours":
            res = run_ours(model_dir, rows, Path(tmp), precision)
        else:
            res = run_trl(model_dir, rows, Path(tmp), precision, grouped=variant == "trl-grouped")
    res.update(
        trainer=variant,
        precision=precision,
        pairs=len(rows),
        threads=torch.get_num_threads(),
        tokens_per_s=res["tokens"] / res["seconds"],
        tokens_per_cpu_s=res["tokens"] / res["cpu_seconds"],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    res["mfu_vs_peak"] = 6 * res["params"] * res["tokens_per_s"] / PEAK_FLOPS[res["precision"]]
    print("RESULT " + json.dumps(res), flush=True)


def _run_variant(variant: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--trainer", variant], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_train_throughput_vs_trl(benchmark) -> None:
    """Variants run interleaved, ROUNDS times each: neighbours' load drifts over minutes, so each variant
    gets comparable slots. Per-step rates are pooled; the median step is the headline, the best step
    (least disturbed) a cross-check."""
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}

    def run_all() -> None:
        for _ in range(ROUNDS):
            for variant in VARIANTS:
                runs[variant].append(_run_variant(variant))

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    stats = {}
    for name, rs in runs.items():
        rates = sorted(rate for r in rs for rate in r["step_tokens_per_s"])
        stats[name] = {
            "median_step_tokens_per_s": statistics.median(rates),
            "best_step_tokens_per_s": rates[-1],
            "tokens_per_cpu_s": sum(r["tokens"] for r in rs) / sum(r["cpu_seconds"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "mfu_median_vs_peak": 6 * rs[0]["params"] * statistics.median(rates) / PEAK_FLOPS[rs[0]["precision"]],
        }
    print(f"\nprecision {runs['ours'][0]['precision']}")
    print(f"{'trainer':<12} {'median tok/s':>12} {'best tok/s':>10} {'tok/CPU-s':>9} {'peak RSS MB':>11} {'MFU':>6}")
    for name, st in stats.items():
        cells = (st["median_step_tokens_per_s"], st["best_step_tokens_per_s"], st["tokens_per_cpu_s"])
        print(f"{name:<12} {cells[0]:>12.1f} {cells[1]:>10.1f} {cells[2]:>9.1f} {st['peak_rss_mb']:>11.0f} "
              f"{st['mfu_median_vs_peak']:>6.1%}")  # fmt: skip
    ours = stats["ours"]
    for base in VARIANTS[1:]:
        ratios = {k: ours[k] / stats[base][k] for k in ("median_step_tokens_per_s", "best_step_tokens_per_s")}
        benchmark.extra_info[f"speedup_vs_{base}"] = {k: round(v, 3) for k, v in ratios.items()}
        print(f"speed-up vs {base}: {ratios['median_step_tokens_per_s']:.2f}x median step, "
              f"{ratios['best_step_tokens_per_s']:.2f}x best step (goal >= 1.3x)")  # fmt: skip
    benchmark.extra_info["stats"] = {k: {m: round(v, 2) for m, v in st.items()} for k, st in stats.items()}
    assert all(st["median_step_tokens_per_s"] > 0 for st in stats.values())


if __name__ == "__main__":
    main()
