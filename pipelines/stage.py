"""The stage contract: one class per pipeline step, in the spirit of datatrove's `PipelineStep`.

A stage reads only its own spec section(s), writes only under `WORKDIR/<name>/`, and must be
resumable: when `run` is called on a directory left by a crashed attempt with the same spec, it
continues from what is there instead of redoing finished work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipelines.spec import ModelSpec, Spec


@dataclass(frozen=True)
class RunLayout:
    """Where everything of a run lives (DESIGN.md §4)."""

    root: Path

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    @property
    def resolved_spec(self) -> Path:
        return self.root / "spec.resolved.yaml"


class Stage(ABC):
    """One step of `codepmp run`. Subclasses set `name` and implement `run`."""

    name: ClassVar[str]

    def __init__(self, spec: Spec, layout: RunLayout) -> None:
        self.spec = spec
        self.layout = layout

    @property
    def outdir(self) -> Path:
        return self.layout.stage_dir(self.name)

    def first_model(self) -> ModelSpec | None:
        """The model this stage loads first on vLLM, if any: an idle engine of that spec is kept for it."""
        return None

    @abstractmethod
    def run(self) -> dict[str, Any]:
        """Do (or resume) the stage's work; return summary figures (counts in/out) for the run log."""
