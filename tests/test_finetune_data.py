"""`humaneval-exec` finetuning data: pairing, canonical solutions, held-out problems, caching, spec errors.

Sampling is replaced by hand-written replies (no model); execution is real (`sdk.sandbox`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

import pipelines.finetune_data as fd
import sdk.sandbox
from pipelines import runner
from pipelines.finetune_data import Candidate, build_humaneval_exec, canonical_reply, pair_candidates
from pipelines.spec import HumanEvalExecSpec, load_spec, validate_spec
from sdk import humaneval
from sdk.data import load_pairs
from sdk.errors import SpecError
from tests.sdk_tiny import make_tiny_lm

GENERATOR = {"model": {"name": "smollm2-135m-instruct"}, "sampling": {"seed": 1}}


def cand(source: str, index: int, status: str, reply: str | None = None) -> Candidate:
    reply = reply if reply is not None else f"{source}-{index}"
    return Candidate("HumanEval/1", source, index, reply, reply, status)


def test_pairs_are_passing_x_failing_in_diagonal_order_capped_and_deduplicated():
    cands = [
        cand("sample", 0, "failed"),
        cand("sample", 1, "passed"),
        cand("sample", 2, "timeout"),
        cand("sample", 3, "failed", reply="sample-0"),  # the same reply as sample 0: counted once
        cand("sample", 4, "error"),  # the sandbox's failure, not the candidate's: never a label
        cand("sample", 5, "memory"),
        cand("canonical", -1, "passed"),
    ]
    pairs = [(c.reply, r.reply) for c, r in pair_candidates(cands, cap=4)]
    assert pairs == [
        ("sample-1", "sample-0"),
        ("sample-1", "sample-2"),
        ("canonical--1", "sample-0"),
        ("sample-1", "sample-5"),
    ]
    assert len(pair_candidates(cands, cap=100)) == 2 * 3  # passing {1, canonical} x failing {0, 2, 5}
    assert pair_candidates([cand("sample", 0, "failed"), cand("sample", 1, "failed")], cap=4) == []
    assert pair_candidates([cand("canonical", -1, "passed")], cap=4) == []


def fake_replies(problem: dict[str, Any]) -> list[str]:
    """Three replies a chat model might give: a correct one, a wrong one, one that does not parse."""
    entry = problem["entry_point"]
    right = f"Here you go:\n\n```python\n{problem['prompt']}{problem['canonical_solution']}```\n"
    wrong = f"```python\ndef {entry}(*args, **kwargs):\n    return None\n```"
    broken = f"```python\ndef {entry}(:\n    pass\n```"
    return [right, wrong, broken]


@pytest.fixture
def fake_sample(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def sample(problems, generator, k, cache_path, *, desc="humaneval"):
        calls.append({"task_ids": [p["task_id"] for p in problems], "k": k, "cache": Path(cache_path)})
        return {p["task_id"]: fake_replies(p)[:k] for p in problems}

    monkeypatch.setattr(humaneval, "sample", sample)
    return calls


def exec_cfg(**kw: Any) -> HumanEvalExecSpec:
    return HumanEvalExecSpec.model_validate(
        {"generator": GENERATOR, "k": 3, "problems": 3, "max_pairs_per_problem": 4, **kw}
    )


def test_build_labels_by_execution_and_includes_the_canonical_solution(fake_sample, tmp_path):
    path, summary = build_humaneval_exec(exec_cfg(), tmp_path / "data")
    assert path == tmp_path / "data" / "humaneval-exec.parquet"
    assert fake_sample[0]["task_ids"] == ["HumanEval/161", "HumanEval/162", "HumanEval/163"]  # the last three
    assert fake_sample[0]["cache"] == tmp_path / "data" / "samples.jsonl"
    rows = pq.read_table(path).to_pylist()
    # per problem: passing {right, canonical} x failing {wrong, broken} = 4 pairs
    assert len(rows) == 12 and summary["pairs"] == 12 and summary["problems_with_pairs"] == 3
    assert summary["sampled_statuses"] == {"failed": 6, "passed": 3} and summary["pass_rate"] == 0.3333
    assert summary["canonical_passed"] == 3 and summary["sandbox_errors"] == 0
    problems = {p["task_id"]: p for p in humaneval.load_problems(3, from_end=True)}
    first = [r for r in rows if r["task_id"] == "HumanEval/163"]
    p163 = problems["HumanEval/163"]
    assert {r["prompt"] for r in first} == {humaneval.problem_prompt(p163)}  # the prompt the model saw
    assert {r["chosen"] for r in first} == {fake_replies(p163)[0], canonical_reply(p163)}
    assert {r["rejected"] for r in first} == set(fake_replies(p163)[1:])
    assert {r["chosen_source"] for r in first} == {"sample", "canonical"}
    assert {r["rejected_status"] for r in rows} == {"failed"}
    # the failing side's reason is one word of a fixed list, never the program's own output (training data)
    assert {r["rejected_detail"] for r in rows} <= set(sdk.sandbox.REASONS) - {"passed"}
    assert load_pairs(str(path)).num_rows == 12  # readable as TRL-format pairs by the SDK
    # the canonical reply runs like any candidate and passes; it is what the prompt asks for: one fenced function
    reply = canonical_reply(p163)
    assert reply.startswith("```python\n" + p163["prompt"].lstrip("\n")) and reply.endswith("\n```")
    assert p163["prompt"].startswith("\n") and not reply.startswith("```python\n\n")  # code right after the fence
    assert humaneval.check([p163], [humaneval.completion_from_reply(p163, reply)], timeout_s=5, memory_mb=512)[0].passed


def test_cap_limits_pairs_per_problem(fake_sample, tmp_path):
    _, summary = build_humaneval_exec(exec_cfg(max_pairs_per_problem=1, problems=2), tmp_path / "data")
    assert summary["pairs"] == 2 and summary["pairs_with_canonical_chosen"] == 0  # a sampled pass comes first


def test_labels_are_cached_as_they_finish_so_a_kill_redoes_none(fake_sample, tmp_path, monkeypatch):
    real = sdk.sandbox.run_many
    runs: list[int] = []  # programs handed to the sandbox, per call

    def killed_after(limit: int | None):
        def run_many(sources, *, on_result, **kw):
            runs.append(len(sources))

            def record(i, result):
                on_result(i, result)
                if i + 1 == limit:  # one worker: results arrive in order
                    raise KeyboardInterrupt

            return real(sources, on_result=record, **{**kw, "workers": 1})

        return run_many

    monkeypatch.setattr(sdk.sandbox, "run_many", killed_after(5))
    with pytest.raises(KeyboardInterrupt):
        build_humaneval_exec(exec_cfg(), tmp_path / "data")
    assert runs == [9]  # 3 problems x 3 distinct programs (the right reply and the canonical one are the same code)
    assert len((tmp_path / "data" / "labels.jsonl").read_text().splitlines()) == 5
    assert not (tmp_path / "data" / "humaneval-exec.parquet").exists()

    monkeypatch.setattr(sdk.sandbox, "run_many", killed_after(None))
    build_humaneval_exec(exec_cfg(), tmp_path / "data")
    assert runs == [9, 4]  # only the programs not labelled before the kill
    first = (tmp_path / "data" / "humaneval-exec.parquet").read_bytes()

    build_humaneval_exec(exec_cfg(), tmp_path / "data")
    assert runs == [9, 4]  # every label cached: nothing runs
    assert (tmp_path / "data" / "humaneval-exec.parquet").read_bytes() == first  # deterministic rebuild


def test_no_pair_at_all_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(humaneval, "sample", lambda problems, *a, **k: {p["task_id"]: ["nope"] for p in problems})
    monkeypatch.setattr(fd, "canonical_reply", lambda problem: "also nope")
    with pytest.raises(Exception, match=r"humaneval-exec: no problem had both a passing and a failing candidate"):
        build_humaneval_exec(exec_cfg(k=1, problems=1), tmp_path / "data")


# --------------------------------------------------------------------------- spec


BASE = {
    "name": "t",
    "pretrain": {"model": "m", "data": "pairs.parquet"},
    "evaluate": {"model": "m", "heldout": "h.parquet", "best_of_n": {"generator": GENERATOR, "problems": 20}},
}


def spec_with(finetune: dict[str, Any], **evaluate: Any) -> Any:
    data = json.loads(json.dumps(BASE))
    data["finetune"] = finetune
    data["evaluate"]["best_of_n"].update(evaluate)
    return validate_spec(data, source="s.yaml")


def test_exec_data_needs_its_settings_and_only_with_that_data():
    with pytest.raises(SpecError, match=r"s\.yaml: finetune: data: humaneval-exec needs a `humaneval_exec` section"):
        spec_with({"data": "humaneval-exec"})
    with pytest.raises(SpecError, match=r"finetune: humaneval_exec is only used with data: humaneval-exec"):
        spec_with({"data": "/x/pairs.parquet", "humaneval_exec": {"generator": GENERATOR}})
    with pytest.raises(SpecError, match=r"finetune\.humaneval_exec\.k: must be > 0"):
        spec_with({"data": "humaneval-exec", "humaneval_exec": {"generator": GENERATOR, "k": 0}})
    ok = spec_with({"data": "humaneval-exec", "humaneval_exec": {"generator": GENERATOR, "problems": 144}})
    assert ok.finetune.humaneval_exec.problems == 144


def test_finetune_problems_may_not_reach_the_evaluated_ones():
    ft = {"data": "humaneval-exec", "humaneval_exec": {"generator": GENERATOR, "problems": 145}}
    with pytest.raises(SpecError) as err:
        spec_with(ft)
    message = str(err.value)
    assert "finetune.humaneval_exec.problems (145) + evaluate.best_of_n.problems (20)" in message
    assert "exceed the 164 HumanEval problems" in message
    with pytest.raises(SpecError, match=r"evaluate\.best_of_n\.problems \(null = all 164\)"):
        spec_with({**ft, "humaneval_exec": {"generator": GENERATOR, "problems": 1}}, problems=None)
    # what the two stages actually load never overlaps when the counts fit
    taken = {p["task_id"] for p in humaneval.load_problems(144, from_end=True)}
    assert not taken & {p["task_id"] for p in humaneval.load_problems(20)}


def test_demo_specs_hold_out_the_evaluated_problems():
    for name in ("local_demo", "ci_small"):
        spec = load_spec(Path(__file__).resolve().parents[1] / "specs" / f"{name}.yaml")
        built, bon = spec.finetune.humaneval_exec, spec.evaluate.best_of_n
        assert spec.finetune.data == "humaneval-exec" and built.problems + bon.problems <= 164, name


# --------------------------------------------------------------------------- the stage


def test_finetune_stage_trains_on_exec_pairs(fake_sample, tmp_path):
    lm = make_tiny_lm(tmp_path / "lm")
    spec = {
        "name": "ft-exec",
        "finetune": {"model": str(lm), "data": "humaneval-exec", "max_steps": 2, "micro_batch_pairs": 4,
                     "grad_accum_steps": 1, "max_length_tokens": 256, "precision": "fp32", "zero_stage": 1,
                     "humaneval_exec": {"generator": GENERATOR, "k": 3, "problems": 2}},
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    results = runner.run_spec(load_spec(tmp_path / "spec.yaml"), tmp_path / "run")
    summary = results[0]["summary"]
    data = tmp_path / "run" / "finetune" / "data"
    assert summary["data"] == f"humaneval-exec ({data / 'humaneval-exec.parquet'})"
    assert summary["pairs"] == summary["exec_pairs"] == 8 and summary["steps"] == 2
    assert (tmp_path / "run" / "finetune" / "final" / "model.safetensors").is_file()
    assert json.loads((data / "summary.json").read_text())["problems"] == 2
    assert "## Finetuning data" in (tmp_path / "run" / "report.md").read_text()
