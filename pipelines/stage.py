"""The stage contract: one class per pipeline step, in the spirit of datatrove's `PipelineStep`.

A stage reads only its own spec section(s), writes only under `WORKDIR/<name>/`, and must be
resumable: when `run` is called on a directory left by a crashed attempt with the same spec, it
continues from what is there instead of redoing finished work.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipelines.errors import SpecError
from pipelines.spec import ModelSpec, Spec
from sdk.fileio import atomic_write_json, is_empty_dir, precious_dirs

MARKER = ".codepmp-run"  # written into every directory codepmp creates for a run; only such a directory is reused


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


def claim_dir(root: Path, label: str, marker: str = MARKER) -> None:
    """Let a run write into `root` (and later delete what it wrote there) only when `root` is new or empty (it is
    created and marked with `marker`) or already marked; refuse anything else before writing a single file.

    `label` names the setting the directory came from (`workdir`, `executor.logging_dir`) in the error.
    """
    if root in precious_dirs():
        raise SpecError(f"{label} {root}: refusing to use /, the home directory or a repository root")
    if (root / marker).is_file():
        return
    if root.exists() and not root.is_dir():
        raise SpecError(f"{label} {root}: exists and is not a directory")
    if root.exists() and not is_empty_dir(root):
        held = sorted(p.name for p in root.iterdir())
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise SpecError(
            f"{label} {root}: not empty and not a codepmp run (it holds {shown}); "
            "use a new or empty directory, or a directory of an earlier codepmp run"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / marker, {"by": "codepmp run", "for": label})
    except OSError as exc:
        raise SpecError(f"{label} {root}: cannot write there ({exc.strerror or exc})") from None


class TaskStage(Stage):
    """A stage whose work is split into datatrove tasks, each taking whole input shards (shard i goes to task
    i mod tasks): a stable split that keeps every output named after its input, so the output is the same
    whatever the number of tasks. The driver (`run`) starts the tasks on the stage's executor, checks that every
    input shard was finished, and sums the figures the tasks left in `done/<shard>.json`.
    """

    upstream: ClassVar[str]

    def inputs(self) -> list[Path]:
        """The upstream stage's output shards, in name order."""
        return sorted((self.layout.stage_dir(self.upstream) / "output").glob("*.jsonl.gz"))

    def done_marker(self, shard: Path) -> Path:
        return self.outdir / "done" / (shard.name.removesuffix(".jsonl.gz") + ".json")

    @abstractmethod
    def run_task(self, rank: int, world_size: int) -> None:
        """Do (or resume) the unfinished input shards `inputs()[rank::world_size]`, each ending in its marker."""

    def run(self) -> dict[str, Any]:
        from pipelines.errors import RunError
        from pipelines.tasks import StageTask, logging_root, make_executor, run_executors

        inputs = self.inputs()
        if not inputs:
            raise RunError(f"{self.name}: no input shards in {self.layout.stage_dir(self.upstream) / 'output'}")
        ex = self.spec.stage_executor(self.name)
        fresh = not any(p.name != "_stage.json" for p in self.outdir.iterdir())
        logs = logging_root(self.spec, self.name, self.outdir, fresh) / f"{ex.tasks}-tasks"  # completions per split
        task = StageTask(type(self), self.spec, self.layout.root)
        executor = make_executor(ex, [task], ex.tasks, logs, f"{self.spec.name}-{self.name}")
        run_executors(ex, self.name, [self.name], [executor])
        unfinished = [p.name for p in inputs if not self.done_marker(p).is_file()]
        if unfinished:
            raise RunError(
                f"{self.name}: every task finished but {len(unfinished)} input shard(s) were not done "
                f"({', '.join(unfinished[:5])}); task logs in {logs}"
            )
        totals: dict[str, Any] = {}
        for shard in inputs:
            for key, value in json.loads(self.done_marker(shard).read_text()).items():
                totals[key] = totals.get(key, 0) + value
        return self.summarize(totals)

    def summarize(self, totals: dict[str, Any]) -> dict[str, Any]:
        """The stage's summary from the figures summed over its input shards (checks, derived figures)."""
        return totals
