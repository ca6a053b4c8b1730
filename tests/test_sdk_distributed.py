"""Several processes: a 2-process ZeRO-2 run on CPU under torchrun (gloo) completes and agrees on its data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdk import RewardModel
from tests.sdk_tiny import make_tiny_lm, planted_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_zero2_run_under_torchrun(tmp_path: Path) -> None:
    lm = make_tiny_lm(tmp_path / "lm")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in planted_pairs(200)))
    cfg = {"max_steps": 6, "micro_batch_pairs": 4, "grad_accum_steps": 2, "zero_stage": 2, "precision": "fp32",
           "save_every_steps": 3, "learning_rate": 3e-3, "warmup_ratio": 0.0}  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "sdk_train_script.py"), str(lm), str(pairs), str(out), json.dumps(cfg)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("DONE 6") == 2  # both ranks finished
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["samples_seen"] == 6 * 4 * 2 * 2  # steps x micro-batch x accumulation x processes
    assert (out / "checkpoints" / "step-0000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    result = RewardModel.from_pretrained(out / "final").evaluate(planted_pairs(50, seed=1))
    assert result["n"] == 50


PORT_TAKEN_BETWEEN_TRAININGS = """
import os, socket
import torch.distributed as dist
from sdk.train import setup_distributed
setup_distributed()
port = int(os.environ["MASTER_PORT"])
dist.destroy_process_group()
taken = socket.socket()
if port:  # another process (a Ray worker, a second test run) binds the port the first training's store had
    taken.bind(("127.0.0.1", port))
    taken.listen()
rank, world, created = setup_distributed()
print("second group", rank, world, created, dist.is_initialized())
"""


def test_a_lone_process_trains_again_after_its_first_port_was_taken() -> None:
    """pretrain -> sampling -> finetune in one `codepmp run`: the second training's store must not need the port
    the first one's had (it failed with EADDRINUSE when a neighbour took it in between)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", PORT_TAKEN_BETWEEN_TRAININGS], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "second group 0 1 True True" in proc.stdout
