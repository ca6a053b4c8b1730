"""The pretrain and finetune stages under the runner, on a tiny random model and planted-preference pairs.

Mechanics, not quality: outputs in the stage dirs, skip on rerun, the pretrain -> finetune chain (data and
fingerprints), and a crash mid-training that resumes from the DeepSpeed checkpoint to the same result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import runner
from pipelines.spec import load_spec
from pipelines.train import PretrainStage, default_save_every, train_config
from sdk.config import TrainConfig
from tests.logs import logged
from tests.sdk_tiny import make_tiny_lm, planted_pairs

FAST = {"precision": "fp32", "weight_decay": 0.0, "warmup_ratio": 0.0, "learning_rate": 3e-3, "zero_stage": 1}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    pq.write_table(pa.Table.from_pylist(planted_pairs(48, seed=0)), root / "code-pairs.parquet")
    (root / "reasoning.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted_pairs(24, seed=1)))
    return {"lm": make_tiny_lm(root / "lm"), "root": root}


def write_spec(inputs: dict[str, Path], tmp_path: Path, **pretrain: Any) -> Path:
    spec = {
        "name": "train-stages",
        "pretrain": {"model": str(inputs["lm"]), "data": str(inputs["root"] / "code-pairs.parquet"),
                     "max_steps": 6, "micro_batch_pairs": 4, "grad_accum_steps": 1, "save_every_steps": 2,
                     **FAST, **pretrain},
        "finetune": {"data": str(inputs["root"] / "reasoning.jsonl"), "max_steps": 3, "micro_batch_pairs": 4,
                     "grad_accum_steps": 1, **FAST},
    }  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(spec: Path, workdir: Path, *overrides: str, **kwargs: Any) -> tuple[list[dict[str, Any]], list[str]]:
    with logged() as lines:
        results = runner.run_spec(load_spec(spec, overrides), workdir, **kwargs)
    return results, lines


def metrics(stage_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_then_finetune_from_its_final_model_then_skip_then_rerun_on_change(inputs, tmp_path):
    spec, workdir = write_spec(inputs, tmp_path), tmp_path / "run"
    results, _ = run(spec, workdir)
    pre, fine = results
    assert (pre["stage"], pre["action"], fine["stage"], fine["action"]) == ("pretrain", "start", "finetune", "start")
    assert pre["summary"]["steps"] == 6 and pre["summary"]["pairs"] == 48 and pre["summary"]["resumed_from"] is None
    assert 0 <= pre["summary"]["final_accuracy"] <= 1 and pre["summary"]["final_loss"] > 0
    for stage, steps in (("pretrain", 6), ("finetune", 3)):
        out = workdir / stage
        assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "config.json").is_file()
        assert [r["step"] for r in metrics(out)] == list(range(1, steps + 1))
    # finetune started from pretrain/final (the saved reward model records what it was loaded from)
    assert fine["summary"]["model"] == str(workdir / "pretrain" / "final")
    assert json.loads((workdir / "finetune" / "final" / "codepmp.json").read_text())["base"] == str(
        workdir / "pretrain" / "final"
    )
    assert all(r["lm"] == 0.0 for r in metrics(workdir / "finetune"))  # finetune: ranking loss only
    assert all(r["lm"] > 0.0 for r in metrics(workdir / "pretrain"))  # pretrain: CodePMP, LM term on
    # checkpoints are pruned to the one `latest` names (steps 2 and 4 were written; the last step exports final/)
    assert sorted(p.name for p in (workdir / "pretrain" / "checkpoints").glob("step-*")) == ["step-0000004"]
    report = (workdir / "report.md").read_text()  # the runner reports after the run: curves of both stages
    assert (
        "![pretrain loss and accuracy](report/pretrain.png)" in report and (workdir / "report/finetune.png").is_file()
    )

    results, lines = run(spec, workdir)
    assert [r["action"] for r in results] == ["skip", "skip"]
    assert sum("skip (already done with this spec)" in line for line in lines) == 2

    before = (workdir / "finetune" / "final" / "model.safetensors").read_bytes()
    results, lines = run(spec, workdir, "pretrain.learning_rate=1e-3")
    assert [r["action"] for r in results] == ["start", "start"]
    assert any("pretrain: start (spec section(s) pretrain changed)" in line for line in lines)
    assert any("finetune: start (upstream stage pretrain changed)" in line for line in lines)
    assert (workdir / "finetune" / "final" / "model.safetensors").read_bytes() != before


def test_crash_mid_pretraining_resumes_from_the_checkpoint_to_the_same_result(inputs, tmp_path, monkeypatch):
    spec = write_spec(inputs, tmp_path)
    reference, _ = run(spec, tmp_path / "reference", only="pretrain")

    real = PretrainStage.after_step

    def crash_after_step_5(self: PretrainStage, step: int, row: dict[str, float]) -> None:
        real(self, step, row)
        if step == 5:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run: no cleanup code of ours runs after it

    monkeypatch.setattr(PretrainStage, "after_step", crash_after_step_5)
    workdir = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(spec, workdir, only="pretrain")
    assert runner.read_record(runner.RunLayout(workdir), "pretrain")["status"] == "running"
    assert (workdir / "pretrain" / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert not (workdir / "pretrain" / "final").exists()

    monkeypatch.setattr(PretrainStage, "after_step", real)
    results, lines = run(spec, workdir, only="pretrain")
    assert any("pretrain: resume (resuming an interrupted attempt)" in line for line in lines)
    summary = results[0]["summary"]
    assert summary["resumed_from"] == 4 and summary["steps"] == 6
    ours, ref = metrics(workdir / "pretrain"), metrics(tmp_path / "reference" / "pretrain")
    assert [r["step"] for r in ours] == list(range(1, 7))
    for mine, theirs in zip(ours, ref, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6), mine["step"]
        assert mine["accuracy"] == theirs["accuracy"] and mine["samples_seen"] == theirs["samples_seen"]
    assert summary["final_loss"] == pytest.approx(reference[0]["summary"]["final_loss"], rel=1e-5)


def test_checkpoint_interval_defaults_to_a_tenth_of_the_run(inputs, tmp_path):
    spec = load_spec(write_spec(inputs, tmp_path, save_every_steps=None, max_steps=None, epochs=2))
    cfg = train_config(spec.pretrain, n_pairs=400)  # 100 micro-batches x 2 epochs / grad_accum 1 = 200 steps
    assert isinstance(cfg, TrainConfig) and cfg.save_every_steps == 20 and cfg.epochs == 2
    assert cfg.learning_rate == FAST["learning_rate"]  # the section's own settings carried over
    assert default_save_every(TrainConfig(max_steps=7), n_pairs=10) == 1
    assert train_config(load_spec(write_spec(inputs, tmp_path)).pretrain, 400).save_every_steps == 2  # as set
