"""The `pairs` stage: pair checks and the balancing writer (see `stage.py`)."""

from pipelines.pairs.stage import PairsStage

__all__ = ["PairsStage"]
