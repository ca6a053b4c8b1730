"""Best-of-N scoring throughput: `best_of_n` (every candidate of every prompt in one batched `score` call)
vs the naive loop calling `score([prompt], [candidate])` once per candidate. Goal: >= 5x candidates/s.

Run (about 1-2 minutes on 2 CPU cores; BENCH_RECORD=1 also writes results/bon.json):

    BENCH_RECORD=1 DS_ACCELERATOR=cpu .venv/bin/python -m pytest benchmarks/bench_bon.py -s --benchmark-only

Same process, same reward model (the bundled SmolLM2-135M-Instruct with a fresh score head, fp32, as
`RewardModel.from_pretrained` gives it), same candidates: BENCH_PROMPTS HumanEval prompts (the user message
of `humaneval.problem_prompt`, 111-160 tokens) x 8 chat replies each, the function in a code fence with its
canonical body cut after 1..all of its lines (real code, about 140-250 tokens). Both sides must pick the same
best candidate of every prompt and give the same scores (to 1e-4): a speed-up that changed the answer would
not count. Sides alternate for BENCH_ROUNDS rounds after one warm-up call each; the machine is shared, so
the headline is the ratio of medians, with candidates per CPU-second of the process next to it.

Measured 2026-12-02 (2 vCPU, torch 2.13 CPU, fp32, CI size: 8 x 8, 1 round, load average 0.8-1.4 with this run
included), two runs: best_of_n 7.03 / 7.11 cand/s, loop 4.13 / 4.23 cand/s: 1.70x / 1.68x wall and CPU, scores equal
to 8.9e-6. best_of_n now shares each prompt's forward across its candidates (`score_ids` with `prefix_lens`: the
prompt runs once, its KV cache is repeated over chunks of 1-4 candidates, mostly 3, sized by the CPU token budget of
1024); without that, plain batches of whole sequences lost to the loop on an idle machine (2026-11-25: 1.04 vs 2.08
cand/s, 0.50x; the loop, unchanged, ran half as fast that day, so compare ratios only), as one sequence alone already
nearly saturates the matmul units of 2 cores. The >= 5x goal is not met on this CPU, and cannot be: at equal FLOPs
batching can win ~2.5x at most here (batched ~70 GFLOP/s, near the ~78 GFLOP/s fp32 matmul peak of DESIGN.md, vs ~30
GFLOP/s for one 300-token sequence), and sharing the prompt (40-54% of each sequence, run once per 8 candidates)
removes ~44% of the FLOPs, ~1.8x more: ~4.5x at best. The ratio grows where batch 1 is far from peak: short sequences
(150 tokens: 19 vs 164 tok/s, 8.6x) and bf16 (330 tokens: 42 vs 326 tok/s, 7.8x) on this CPU, and a GPU, where one
sequence leaves it almost idle. A fresh-clone CI run on an AMD EPYC Zen 3 (2026-12-03): 3.24 vs 1.55 cand/s, 2.09x.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
PROMPTS = int(os.environ.get("BENCH_PROMPTS", 8))
CANDIDATES = 8
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))
RESULTS = Path(__file__).with_name("results") / "bon.json"


def workload(prompts: int, per_prompt: int) -> tuple[list[str], list[list[str]]]:
    from sdk import humaneval as he

    problems = he.load_problems(prompts)
    candidates = []
    for p in problems:
        body = p["canonical_solution"].rstrip("\n").splitlines()
        cuts = sorted({max(1, round(len(body) * (j + 1) / per_prompt)) for j in range(per_prompt)})
        cuts = (cuts * per_prompt)[:per_prompt]  # short solutions repeat cuts: still per_prompt candidates
        candidates.append([f"```python\n{p['prompt']}" + "\n".join(body[:c]) + "\n```" for c in cuts])
    return [he.problem_prompt(p) for p in problems], candidates


def loop_best(rm, prompts: list[str], candidates: list[list[str]]) -> list[tuple[int, list[float]]]:
    """The naive way: one `score` call per candidate."""
    out = []
    for prompt, cands in zip(prompts, candidates, strict=True):
        scores = [rm.score([prompt], [c])[0] for c in cands]
        out.append((max(range(len(cands)), key=lambda i: (scores[i], -i)), scores))
    return out


def test_bon_scoring_throughput(benchmark) -> None:
    import torch

    from sdk import RewardModel, best_of_n

    rm = RewardModel.from_pretrained(MODEL)
    prompts, candidates = workload(PROMPTS, CANDIDATES)
    n = sum(map(len, candidates))
    sides = {
        "best_of_n": lambda: [(r.best_index, r.scores) for r in best_of_n(prompts, candidates, reward_model=rm)],
        "loop": lambda: loop_best(rm, prompts, candidates),
    }
    # warm-up: one-off allocations and oneDNN kernel selection
    best_of_n(prompts[:1], candidates[:1], reward_model=rm)
    rm.score(prompts[:1], candidates[0][:1])
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
    picks: dict[str, list] = {}

    def run_all() -> None:
        for _ in range(ROUNDS):
            for name, side in sides.items():
                wall, cpu = time.perf_counter(), time.process_time()
                picks[name] = side()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    batched, looped = picks["best_of_n"], picks["loop"]
    assert [b for b, _ in batched] == [b for b, _ in looped]
    max_diff = max(
        abs(x - y) for (_, a), (_, b) in zip(batched, looped, strict=True) for x, y in zip(a, b, strict=True)
    )
    assert max_diff < 1e-4

    stats = {
        name: {
            "candidates_per_s": n / statistics.median(w for w, _ in ts),
            "candidates_per_cpu_s": n / statistics.median(c for _, c in ts),
            "median_seconds": statistics.median(w for w, _ in ts),
        }
        for name, ts in times.items()
    }
    ratio = {k: stats["best_of_n"][k] / stats["loop"][k] for k in ("candidates_per_s", "candidates_per_cpu_s")}
    benchmark.extra_info["speedup_vs_loop"] = {k: round(v, 3) for k, v in ratio.items()}
    benchmark.extra_info["stats"] = {k: {m: round(v, 3) for m, v in s.items()} for k, s in stats.items()}
    benchmark.extra_info["max_score_diff"] = max_diff
    print(f"\n{n} candidates ({PROMPTS} prompts x {CANDIDATES}), {ROUNDS} rounds, {torch.get_num_threads()} threads")
    for name, s in stats.items():
        print(f"{name:<10} {s['candidates_per_s']:8.2f} cand/s {s['candidates_per_cpu_s']:8.2f} cand/CPU-s")
    print(f"speed-up: {ratio['candidates_per_s']:.2f}x wall, {ratio['candidates_per_cpu_s']:.2f}x CPU (goal >= 5x)")
    print(f"max score difference {max_diff:.1e}, load average {os.getloadavg()}")
    if not os.environ.get("BENCH_RECORD"):  # `make bench` in CI must leave the tree clean
        return
    RESULTS.parent.mkdir(exist_ok=True)
    record = {
        "candidates": n,
        "prompts": PROMPTS,
        "rounds": ROUNDS,
        "threads": torch.get_num_threads(),
        **stats,
        "speedup_vs_loop": ratio,
        "max_score_diff": max_diff,
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": os.getloadavg(),
    }
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, RESULTS)
