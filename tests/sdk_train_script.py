"""A training run in its own process, for the kill-and-resume and multi-process tests.

usage: python sdk_train_script.py LM_DIR PAIRS OUTPUT_DIR CONFIG_JSON [PAUSE_AT_STEP]
Prints `STEP n` after each optimizer step; at PAUSE_AT_STEP it sleeps so the test can SIGKILL it mid-run.
"""

from __future__ import annotations

import json
import sys
import time

from sdk import RewardModel
from sdk.config import TrainConfig
from sdk.train import train


def main() -> None:
    lm_dir, pairs, out, cfg = sys.argv[1:5]
    pause_at = int(sys.argv[5]) if len(sys.argv) > 5 else -1

    def on_step(step: int, row: dict) -> None:
        print(f"STEP {step} {row['loss']:.6f}", flush=True)
        if step == pause_at:
            time.sleep(600)

    rm = RewardModel.from_pretrained(lm_dir)
    result = train(rm, pairs, out, TrainConfig(**json.loads(cfg)), on_step=on_step)
    print(f"DONE {result.steps} resumed_from={result.resumed_from}", flush=True)


if __name__ == "__main__":
    main()
