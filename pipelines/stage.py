"""The stage contract: one class per pipeline step, in the spirit of datatrove's `PipelineStep`.

A stage class carries its own metadata, and the runner, the fingerprints and `codepmp plan` loop over the
classes (`pipelines/stages.py` lists them in pipeline order) without knowing any stage by name:
- what it reads: the spec sections of its skip-if-done hash (`reads`, `sections`) and the upstream stages whose
  outputs it takes (`upstream`, with `feeds` saying what to declare when one is missing);
- what it writes: `writes`, globs under WORKDIR/<name>/;
- how it splits into tasks: `executor` (None: it runs in the `codepmp run` process);
- what it costs: `estimate`, which also hands counts on to the next stage's estimate.

A stage writes only under `WORKDIR/<name>/`, and must be resumable: when `run` is called on a directory left by
a crashed attempt with the same spec, it continues from what is there instead of redoing finished work.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipelines.spec import LocalExecutor, RayExecutor, SlurmExecutor, Spec
from sdk.config import ModelSpec
from sdk.errors import RunError, SpecError
from sdk.fileio import atomic_write_json, is_empty_dir, precious_dirs

if TYPE_CHECKING:
    from pipelines.costs import Flow, StagePlan

MARKER = ".codepmp-run"  # written into every directory codepmp creates for a run; only such a directory is reused
RECORD = "_stage.json"  # a stage's record in its directory: status, fingerprint, summary, outputs


@dataclass(frozen=True)
class RunLayout:
    """Where everything of a run lives (DESIGN.md §4)."""

    root: Path

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    @property
    def resolved_spec(self) -> Path:
        return self.root / "spec.resolved.yaml"


def read_record(layout: RunLayout, stage: str) -> dict[str, Any] | None:
    """A stage's `_stage.json` (None before its first run; status "corrupt" when it cannot be read)."""
    path = layout.stage_dir(stage) / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"status": "corrupt"}
    return record if isinstance(record, dict) else {"status": "corrupt"}


class Stage(ABC):
    """One step of `codepmp run`. Subclasses set the class variables and implement `run` and `estimate`."""

    name: ClassVar[str]
    section: ClassVar[str]  # the spec section whose presence declares the stage
    reads: ClassVar[tuple[str, ...]]  # spec sections it reads: the input of its skip-if-done hash
    writes: ClassVar[tuple[str, ...]]  # what it leaves under WORKDIR/<name>/ (globs), as `plan` shows it
    feeds: ClassVar[dict[str, str]] = {}  # upstream stage -> what to add to a spec that lacks it

    def __init__(self, spec: Spec, layout: RunLayout) -> None:
        self.spec = spec
        self.layout = layout

    @classmethod
    def declared(cls, spec: Spec) -> bool:
        return getattr(spec, cls.section) is not None

    @classmethod
    def upstream(cls, spec: Spec) -> list[str]:
        """Stages whose outputs this one reads, given what the spec points at explicitly."""
        return []

    @classmethod
    def executor(cls, spec: Spec) -> LocalExecutor | SlurmExecutor | RayExecutor | None:
        """Where the stage's tasks run; None: in the `codepmp run` process itself."""
        return None

    @classmethod
    def sections(cls, spec: Spec) -> dict[str, Any]:
        """The spec sections this stage reads, as plain data: the only input of its skip-if-done hash."""
        return {n: None if getattr(spec, n) is None else getattr(spec, n).model_dump(mode="json") for n in cls.reads}

    @classmethod
    def section_hash(cls, spec: Spec) -> str:
        blob = json.dumps(cls.sections(spec), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    @abstractmethod
    def estimate(cls, spec: Spec, layout: RunLayout, flow: Flow) -> StagePlan:
        """The stage's size and cost for `codepmp plan`, from the counts `flow` carries (which it updates)."""

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


class DistributedStage(Stage):
    """A stage that runs its work (or part of it) as datatrove tasks on its executor: its own `executor` override,
    else the top-level one. Each task calls `run_task(rank, world_size)` in its own process (one vLLM engine per
    task); `run_tasks` starts them and waits."""

    @classmethod
    def executor(cls, spec: Spec) -> LocalExecutor | SlurmExecutor | RayExecutor | None:
        """The stage's own `executor` override, else the top-level one."""
        own = getattr(getattr(spec, cls.section), "executor", None)
        return own if own is not None else spec.executor

    @classmethod
    def sections(cls, spec: Spec) -> dict[str, Any]:
        """Its own section without its `executor`: the outputs do not depend on where or in how many tasks it
        ran (per-request seeds, a split by input unit, outputs named after inputs), so moving it to another
        cluster or task count resumes its finished work instead of discarding it."""
        sections = super().sections(spec)
        if sections[cls.section] is not None:
            sections[cls.section].pop("executor", None)
        return sections

    @abstractmethod
    def run_task(self, rank: int, world_size: int) -> None:
        """Do (or resume) this task's share of the units, `units[rank::world_size]`."""

    def run_tasks(self) -> Path:
        """Start the tasks on the stage's executor and wait for them; returns where their logs are."""
        from pipelines.tasks import StageTask, logging_root, make_executor, run_executors, task_cpus

        ex = self.executor(self.spec)
        assert ex is not None
        self.outdir.mkdir(parents=True, exist_ok=True)
        fresh = not any(p.name != "_stage.json" for p in self.outdir.iterdir())
        logs = logging_root(self.spec, self.name, ex, self.outdir, fresh) / f"{ex.tasks}-tasks"  # completions per split
        task = StageTask(type(self), self.spec, self.layout.root, task_cpus(ex, ex.tasks))
        executor = make_executor(ex, [task], ex.tasks, logs, f"{self.spec.name}-{self.name}")
        run_executors(ex, self.name, [self.name], [executor])
        return logs


class TaskStage(DistributedStage):
    """A stage whose work is split into datatrove tasks, each taking whole input shards (shard i goes to task
    i mod tasks): a stable split that keeps every output named after its input, so the output is the same
    whatever the number of tasks. The driver (`run`) starts the tasks on the stage's executor, checks that every
    input shard was finished, and sums the figures the tasks left in `done/<shard>.json`.
    """

    input_stage: ClassVar[str]  # the stage whose output shards are this one's inputs

    @classmethod
    def upstream(cls, spec: Spec) -> list[str]:
        return [cls.input_stage]

    @classmethod
    def executor(cls, spec: Spec) -> LocalExecutor | SlurmExecutor | RayExecutor:
        ex = super().executor(spec)
        assert ex is not None
        return ex

    def inputs(self) -> list[Path]:
        """The upstream stage's output shards, in name order."""
        return sorted((self.layout.stage_dir(self.input_stage) / "output").glob("*.jsonl.gz"))

    def done_marker(self, shard: Path) -> Path:
        return self.outdir / "done" / (shard.name.removesuffix(".jsonl.gz") + ".json")

    def run(self) -> dict[str, Any]:
        inputs = self.inputs()
        if not inputs:
            raise RunError(f"{self.name}: no input shards in {self.layout.stage_dir(self.input_stage) / 'output'}")
        logs = self.run_tasks()
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
