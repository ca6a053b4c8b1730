"""describe/generate mechanics without an engine: request cache, seeds, truncation rule, drop rules, shards."""

from __future__ import annotations

import gzip
import os
import types
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipelines.describe import clean_instruction, drop_reason, fit_code
from pipelines.generate import generation_prompt
from pipelines.languages import stdlib_dir
from pipelines.shards import chunks, read_shards, write_shard
from pipelines.spec import GENERATE_TEMPLATE, DescribeSpec
from sdk.config import ModelSpec
from sdk.engine import (
    Generator,
    RequestCache,
    cpu_dtype,
    model_label,
    request_seed,
    set_engine_process,
)
from sdk.errors import DataError
from sdk.models import resolve_model


def test_request_cache_survives_a_torn_last_line(tmp_path: Path):
    cache = RequestCache(tmp_path / "c.jsonl")
    cache.append("a", [{"text": "x", "finish_reason": "stop", "tokens": 1}])
    cache.append("b", [{"text": "y", "finish_reason": "length", "tokens": 2}])
    with cache.path.open("a") as handle:
        handle.write('{"rid": "c", "samples": [{"te')  # killed mid-write
    assert set(cache.load()) == {"a", "b"}
    assert cache.load()["b"][0]["finish_reason"] == "length"


def test_a_request_finished_after_a_torn_line_is_not_paid_for_again(tmp_path: Path):
    cache = RequestCache(tmp_path / "c.jsonl")
    cache.append("a", [{"text": "x", "finish_reason": "stop", "tokens": 1}])
    with cache.path.open("a") as handle:
        handle.write('{"rid": "b", "samples": [{"te')  # killed mid-write
    assert set(cache.load()) == {"a"}  # the resumed run loads the cache ...
    cache.extend([("c", [{"text": "z", "finish_reason": "stop", "tokens": 1}]), ("d", [])])  # ... and goes on
    assert set(cache.load()) == {"a", "c", "d"}  # not glued to the torn line and lost on the next resume


def test_request_seeds_depend_on_request_and_base_seed_only():
    assert request_seed(0, "doc-1") == request_seed(0, "doc-1")
    assert request_seed(0, "doc-1") != request_seed(0, "doc-2")
    assert request_seed(0, "doc-1") != request_seed(1, "doc-1")
    assert 0 <= request_seed(7, "x") < 2**31


def test_engine_core_runs_in_process_on_cpu_only_while_no_process_group_is_live(monkeypatch, tmp_path: Path):
    import torch.distributed as dist

    import sdk.engine as engine

    var = "VLLM_ENABLE_V1_MULTIPROCESSING"
    monkeypatch.setenv(var, "")  # restored after the test
    monkeypatch.setattr(engine, "_USER_ENGINE_PROCESS", None)
    set_engine_process(cuda=False)
    assert os.environ[var] == "0"
    set_engine_process(cuda=True)
    assert os.environ[var] == "1"  # GPU: vLLM's own default, a separate EngineCore process
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        set_engine_process(cuda=False)  # in-process, closing the engine would destroy this group
        assert os.environ[var] == "1"
    finally:
        dist.destroy_process_group()
    monkeypatch.setattr(engine, "_USER_ENGINE_PROCESS", "1")
    set_engine_process(cuda=False)
    assert os.environ[var] == "1"


def test_model_label_names_the_derivation():
    assert model_label(ModelSpec(name="m")) == "m"
    assert model_label(ModelSpec(name="m", prune={"keep_first": 13, "keep_last": 13})) == "m[prune 13+13]"


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        (
            "Instruction: Write a function that merges two sorted lists.",
            "Write a function that merges two sorted lists.",
        ),
        ('"Implement a LRU cache."', "Implement a LRU cache."),
        (
            "Write a parser.\n```python\ndef parse(s):\n    ...\n```\nIt returns a dict.",
            "Write a parser.\n\nIt returns a dict.",
        ),
    ],
)
def test_clean_instruction_removes_labels_and_pasted_code(raw: str, cleaned: str):
    assert clean_instruction(raw) == cleaned


def test_drop_rules():
    cfg = DescribeSpec(model={"name": "m"}, min_instruction_chars=20)
    assert drop_reason("", "   ", cfg) == "empty"
    loop = "Write the code.\n" * 8
    assert drop_reason(clean_instruction(loop), loop, cfg) == "repetition_loop"
    pasted = "```python\nimport os\nprint(os.getcwd())\n```"
    assert drop_reason(clean_instruction(pasted), pasted, cfg) == "too_short"
    good = "Write a function that returns the n-th Fibonacci number using iteration."
    assert drop_reason(good, good, cfg) is None


def test_generation_prompt_fills_language_and_fence_tag():
    template = "{instruction}\nUse {language} in a ```{language_tag}``` block."
    assert generation_prompt(template, {"instruction": "Sort.", "language": "c++"}) == (
        "Sort.\nUse c++ in a ```cpp``` block."
    )
    assert "python" in generation_prompt(template, {"instruction": "Sort.", "language": "python"})


def test_shards_round_trip_in_named_chunks_and_name_a_corrupt_file(tmp_path: Path):
    records = [{"id": str(i), "text": "é" * i} for i in range(5)]
    shard = tmp_path / "out" / "00003.jsonl.gz"
    assert write_shard(shard, records) == 5
    assert list(read_shards([shard])) == records
    assert not list((tmp_path / "out").glob(".*.tmp"))
    parts = list(chunks(shard, 2))
    assert [unit for unit, _ in parts] == ["00003-00000", "00003-00001", "00003-00002"]
    assert [r for _, chunk in parts for r in chunk] == records and [len(c) for _, c in parts] == [2, 2, 1]
    write_shard(tmp_path / "again.jsonl.gz", records)  # another temp name, another time: the same bytes
    assert (tmp_path / "again.jsonl.gz").read_bytes() == shard.read_bytes()
    write_shard(tmp_path / "empty.jsonl.gz", [])
    assert list(chunks(tmp_path / "empty.jsonl.gz", 2)) == []
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"id": 1}\nnot json\n'))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: not a JSON object"):
        list(read_shards([bad]))


def test_write_shard_leaves_nothing_when_interrupted(tmp_path: Path):
    def records():
        yield {"id": "1"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "part.jsonl.gz", records())
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tokenizer_only_generator():
    """The bundled model's real tokenizer and chat template, without starting an engine."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    fake = types.SimpleNamespace(tokenizer=tokenizer, max_model_len=1024)
    fake.render = types.MethodType(Generator.render, fake)
    fake.fit = types.MethodType(Generator.fit, fake)
    return fake


def test_long_files_keep_their_head_cut_at_a_line_break(tokenizer_only_generator):
    gen = tokenizer_only_generator
    cfg = DescribeSpec(model={"name": "m"}, max_input_tokens=300, sampling={"max_new_tokens": 64})
    text = (stdlib_dir() / "textwrap.py").read_text()
    ids, source_tokens, truncated = fit_code(gen, cfg, {"text": text, "metadata": {"language": "python"}})
    assert truncated and source_tokens > 300 and len(ids) <= 300
    prompt = gen.tokenizer.decode(ids)
    kept = prompt.split("```python\n", 1)[1].split("\n```", 1)[0]  # the template wraps {code} in a fence
    assert text.startswith(kept) and kept.endswith("\n")  # the head, whole lines only
    assert len(kept) > 200  # and as much of it as fits
    short = "def f():\n    return 1\n"
    ids, _, truncated = fit_code(gen, cfg, {"text": short, "metadata": {"language": "python"}})
    assert not truncated and short in gen.tokenizer.decode(ids)


def test_prompt_budget_also_respects_the_model_context(tokenizer_only_generator):
    gen = tokenizer_only_generator
    cfg = DescribeSpec(model={"name": "m"}, max_input_tokens=4096, sampling={"max_new_tokens": 900})
    text = (stdlib_dir() / "textwrap.py").read_text()
    ids, _, truncated = fit_code(gen, cfg, {"text": text, "metadata": {}})
    assert truncated and len(ids) <= 1024 - 900


def test_an_overlong_instruction_is_cut_but_the_prompt_still_ends_with_the_assistant_turn(tokenizer_only_generator):
    gen = tokenizer_only_generator
    instruction = "".join(f"Step {i}: handle the case where the input list has {i} items.\n" for i in range(200))
    fill = lambda text: generation_prompt(GENERATE_TEMPLATE, {"instruction": text, "language": "python"})  # noqa: E731
    ids, tokens, truncated = gen.fit(fill, instruction, 256, True)
    assert truncated and tokens > 256 and len(ids) <= 256
    prompt = gen.tokenizer.decode(ids)
    assert prompt.endswith("<|im_start|>assistant\n")  # the chat markup that asks for a reply survives
    assert "Implement this in python" in prompt and "Step 0:" in prompt and "Step 199:" not in prompt


def test_auto_dtype_is_float32_on_cpu_and_an_explicit_one_is_kept():
    """vLLM's own "auto" is bfloat16 on CPU, which is not batch-invariant there (a resumed run diverges)."""
    assert cpu_dtype("auto") == "float32"
    assert cpu_dtype("bfloat16") == "bfloat16"
