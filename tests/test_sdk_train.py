"""The DeepSpeed training loop on tiny random models: learning, checkpoints, exact resume, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

import sdk.train
from sdk import RewardModel
from sdk.config import TrainConfig
from sdk.data import encode_pairs
from sdk.errors import DataError
from sdk.model import finetune_defaults
from sdk.train import TrainingDiverged, train
from tests.sdk_tiny import build_tokenizer, make_tiny_lm, planted_pairs

ROOT = Path(__file__).resolve().parents[1]
FAST = {"precision": "fp32", "weight_decay": 0.0, "warmup_ratio": 0.05, "learning_rate": 3e-3}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in planted_pairs(400)))
    return path


def test_tiny_model_learns_planted_preference(lm_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """CodePMP loss (ranking + LM) under ZeRO-2; held-out pairs come from another seed."""
    rm = RewardModel.from_pretrained(lm_dir)
    heldout = planted_pairs(200, seed=1, language=True)
    before = rm.evaluate(heldout)["accuracy"]
    result = rm.pretrain(pairs_file, tmp_path / "run", max_steps=80, micro_batch_pairs=8, grad_accum_steps=1,
                         zero_stage=2, **FAST)  # fmt: skip
    after = rm.evaluate(heldout)
    assert before < 0.8, before
    assert after["accuracy"] > 0.9, after
    assert set(after["by_language"]) == {"python", "rust"}
    assert result.history[-1]["lm"] < result.history[0]["lm"]  # the LM term trains too
    assert RewardModel.from_pretrained(result.final_dir).evaluate(heldout)["accuracy"] == after["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 81)) and rows[-1]["samples_seen"] == 640
    assert {"loss", "ranking", "lm", "accuracy", "lr", "tokens_per_s"} <= set(rows[0])
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["pairs_in"] == summary["pairs_used"] == 400 and summary["dropped"] == {}

    # the same in-memory model goes on to finetuning (ranking loss only), as in the CodePMP recipe
    tuned = rm.finetune(pairs_file, tmp_path / "ft", max_steps=5, micro_batch_pairs=8, zero_stage=2, **FAST)
    assert tuned.resumed_from is None and all(r["lm"] == 0.0 for r in tuned.history)
    assert not torch.distributed.is_initialized()  # a later in-process vLLM engine would adopt and destroy it
    assert rm.evaluate(heldout)["accuracy"] > 0.9


def test_bf16_zero3_top_layers_checkpointing_and_ladder(lm_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """bf16 + ZeRO-3 + trainable_layers + gradient checkpointing + grad accumulation, ladder exports."""
    rm = RewardModel.from_pretrained(lm_dir)
    before = {k: v.clone() for k, v in rm.module.classifier.state_dict().items()}
    head_before = rm.module.lm_head.weight.detach().clone()
    result = rm.pretrain(pairs_file, tmp_path / "run", max_steps=5, micro_batch_pairs=4, grad_accum_steps=2,
                         zero_stage=3, precision="bf16", trainable_layers=1, gradient_checkpointing=True,
                         ladder_checkpoints=True, learning_rate=1e-2, warmup_ratio=0.0)  # fmt: skip
    ladder = sorted(p.name for p in (tmp_path / "run" / "ladder").iterdir())
    assert ladder == [f"step-{s:07d}" for s in (1, 2, 3, 4, 5)]
    saved = load_file(str(result.final_dir / "model.safetensors"))
    assert saved["score.weight"].dtype == torch.bfloat16
    frozen, trained = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(saved[frozen], before[frozen].bfloat16())  # below trainable_layers: untouched
    assert not torch.equal(saved[trained], before[trained].bfloat16())
    assert torch.equal(saved["model.embed_tokens.weight"], before["model.embed_tokens.weight"].bfloat16())
    assert not torch.equal(saved["lm_head.weight"], head_before.bfloat16())  # an untied LM head trains
    assert len(rm.score(["A:"], ["abc"])) == 1  # the in-memory model is usable after ZeRO-3


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    lm_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sdk.train.reward_model_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 4:  # step 4 (one micro-batch per step)
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(sdk.train, "reward_model_loss", poisoned)
    out = tmp_path / "run"
    cfg = {"max_steps": 6, "micro_batch_pairs": 4, "grad_accum_steps": 1, "save_every_steps": 2, "zero_stage": 1}
    cfg.update(FAST)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*step-0000002"):
        RewardModel.from_pretrained(lm_dir).finetune(pairs_file, out, **cfg)
    assert not torch.distributed.is_initialized()  # the group it created is gone, error or not
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    assert not (out / "final").exists() and not (out / "checkpoints" / "step-0000004").exists()

    monkeypatch.setattr(sdk.train, "reward_model_loss", real)
    result = RewardModel.from_pretrained(lm_dir).finetune(pairs_file, out, **cfg)  # the checkpoint resumes
    assert result.resumed_from == 2 and (out / "final" / "model.safetensors").is_file()
    assert result.history[-1]["lm"] == 0.0  # finetune: ranking only


def test_resume_refuses_a_checkpoint_of_another_model(lm_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = {"max_steps": 3, "micro_batch_pairs": 4, "grad_accum_steps": 1, "save_every_steps": 1, "zero_stage": 0}
    cfg.update(FAST)
    RewardModel.from_pretrained(lm_dir).pretrain(pairs_file, out, **cfg)
    other = make_tiny_lm(tmp_path / "other", layers=3)
    with pytest.raises(DataError, match=r"checkpoints/step-0000002 was written for another model"):
        RewardModel.from_pretrained(other).pretrain(pairs_file, out, **cfg)
    with pytest.raises(DataError, match="other data or batching"):
        RewardModel.from_pretrained(lm_dir).pretrain(pairs_file, out, **{**cfg, "micro_batch_pairs": 2})


def test_pairs_identical_after_truncation_are_dropped_and_counted() -> None:
    tok = build_tokenizer()
    rows = [
        {"prompt": "P:", "chosen": "aaaa" + "x" * 30, "rejected": "bbbb" + "x" * 30},  # differ only at the start
        {"prompt": "P:", "chosen": "same", "rejected": "same"},
        {"prompt": "P:", "chosen": "abc", "rejected": "abd"},
    ]
    enc = encode_pairs(pa.Table.from_pylist(rows), tok, max_length=20)
    assert enc.dropped_identical == 2 and enc.drops == {"identical_after_truncation": 2}
    assert [p.index for p in enc.pairs] == [2] and enc.truncated == 1
    with pytest.raises(DataError, match="no usable pairs"):
        encode_pairs(pa.Table.from_pylist(rows[:2]), tok, max_length=20)


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    real_path = sdk.train.Path
    monkeypatch.setattr(sdk.train, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f avx512bw\n")  # AVX-512 without bf16: emulated
    assert sdk.train.resolve_precision("auto") == "fp32"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert sdk.train.resolve_precision("auto") == "bf16"
    assert sdk.train.ds_config(TrainConfig(precision="auto"), 1)["bf16"]["enabled"]
    cpuinfo.unlink()  # no /proc (not Linux)
    assert sdk.train.resolve_precision("auto") == "fp32"
    assert not sdk.train.ds_config(TrainConfig(precision="auto"), 1)["bf16"]["enabled"]
    assert sdk.train.resolve_precision("bf16") == "bf16"  # an explicit choice is kept


def test_finetune_defaults_come_from_the_spec() -> None:
    assert finetune_defaults() == {"lm_coef": 0.0, "schedule": "cosine"}


def _run_script(lm: Path, pairs: Path, out: Path, cfg: dict, pause_at: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a fresh single process, as a user would start it
    args = [sys.executable, str(ROOT / "tests" / "sdk_train_script.py"), str(lm), str(pairs), str(out), json.dumps(cfg)]
    return subprocess.Popen([*args, *([str(pause_at)] if pause_at else [])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)  # fmt: skip


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_the_uninterrupted_loss_curve(
    lm_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    cfg = {"max_steps": 10, "micro_batch_pairs": 4, "grad_accum_steps": 2, "save_every_steps": 3, "zero_stage": 2,
           "epochs": 1.0, **FAST, "schedule": "wsd", "decay_ratio": 0.3}  # fmt: skip
    reference = train(RewardModel.from_pretrained(lm_dir), pairs_file, tmp_path / "ref", TrainConfig(**cfg))

    out = tmp_path / "killed"
    proc = _run_script(lm_dir, pairs_file, out, cfg, pause_at=5)
    for line in proc.stdout:
        if line.startswith("STEP 5"):
            os.kill(proc.pid, signal.SIGKILL)  # mid-run: steps 4-5 done after the step-3 checkpoint
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000003"

    resumed = _run_script(lm_dir, pairs_file, out, cfg)
    stdout, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stdout
    assert "DONE 10 resumed_from=3" in stdout
    steps = [line.split()[1] for line in stdout.splitlines() if line.startswith("STEP")]
    assert steps == [str(s) for s in range(4, 11)]  # continues at the step after the checkpoint
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    for ours, ref in zip(rows, reference.history, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), ours["step"]
        assert ours["samples_seen"] == ref["samples_seen"] and ours["tokens"] == ref["tokens"]  # the same samples
        assert ours["lr"] == pytest.approx(ref["lr"])
