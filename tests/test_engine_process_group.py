"""A generation engine must leave the run's training process group alone.

`codepmp run` samples with vLLM, trains (DeepSpeed initialises torch.distributed) and then samples again in
the same process (finetune's HumanEval data, evaluate's Best-of-N). An in-process vLLM EngineCore adopts a
live process group and destroys it when it closes: the next stage's training failed (ci_small died in
finetune). So the engine runs in-process (faster on CPU) only while no group is live, and training tears down
the group it created once it is done.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    # Port 0: the store binds whatever port is free (a fixed one may be another test's).
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    import deepspeed
    import torch.distributed as dist

    from sdk.config import ModelSpec
    from sdk.engine import Generator

    # The in-process engine while no group is live: train_generate_train's "between stages" shows it.
    deepspeed.init_distributed(dist_backend="gloo")  # a launcher's (or a user's) group, live across stages
    gen = Generator(ModelSpec(name="smollm2-135m-instruct", max_model_len=512, cpu_kvcache_gib=1, enforce_eager=True))
    print("engine during training:", type(gen.llm.llm_engine.engine_core).__name__)
    gen.close()
    print("process group kept:", dist.is_initialized())


def train_generate_train(tmp: Path) -> None:
    """pretrain -> an engine -> finetune in one process, as `codepmp run` does, with no group set up outside."""
    from sdk import RewardModel
    from sdk.config import ModelSpec
    from sdk.engine import Generator
    from tests.sdk_tiny import make_tiny_lm, planted_pairs

    rm = RewardModel.from_pretrained(make_tiny_lm(tmp / "lm"))
    cfg = {"max_steps": 2, "micro_batch_pairs": 2, "grad_accum_steps": 1, "precision": "fp32", "zero_stage": 2}
    rm.pretrain(planted_pairs(8), tmp / "pretrain", **cfg)
    gen = Generator(ModelSpec(name="smollm2-135m-instruct", max_model_len=512, cpu_kvcache_gib=1, enforce_eager=True))
    print("engine between stages:", type(gen.llm.llm_engine.engine_core).__name__)
    gen.close()
    rm.finetune(planted_pairs(8), tmp / "finetune", **cfg)
    print("finetune after the engine: done")


def test_closing_a_generator_keeps_the_training_process_group() -> None:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine during training: SyncMPClient" in proc.stdout
    assert "process group kept: True" in proc.stdout


def test_training_leaves_no_group_behind_so_the_next_engine_runs_in_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine between stages: InprocClient" in proc.stdout  # the fast path while no group is live
    assert "finetune after the engine: done" in proc.stdout


if __name__ == "__main__":
    if len(sys.argv) > 1:
        train_generate_train(Path(sys.argv[1]))
    else:
        main()
