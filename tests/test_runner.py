"""Runner mechanics: stage order, skip-if-done, resume after a crash, rerun on change, selection, locking.

The stages here are small stand-ins that only write files: they check the orchestration, not the work.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from pipelines import runner
from pipelines.errors import RunError, SpecError
from pipelines.spec import STAGES, Spec, load_spec
from pipelines.stage import Stage

SPEC = """
name: t
source: {paths: [stdlib], limit: 3}
describe: {model: {name: m}}
generate: {strong: {model: {name: a}}, weak: {model: {name: b}}}
pairs: {}
"""


class Recorder(Stage):
    """Appends one line per run to out.txt; crashes after a partial write when `crash_in` names it."""

    calls: ClassVar[list[str]] = []
    crash_in: ClassVar[str | None] = None

    def run(self) -> dict[str, Any]:
        out = self.outdir / "out.txt"
        resumed = out.exists()
        with out.open("a") as handle:
            handle.write(f"{self.name}:{self.spec.section_hash(self.name)}\n")
        type(self).calls.append(self.name + (" (resumed)" if resumed else ""))
        if type(self).crash_in == self.name:
            type(self).crash_in = None
            raise RuntimeError("simulated crash")
        return {"lines": len(out.read_text().splitlines())}


@pytest.fixture
def stages(monkeypatch: pytest.MonkeyPatch) -> type[Recorder]:
    classes = {name: type(f"{name}Stage", (Recorder,), {"name": name}) for name in STAGES}
    monkeypatch.setattr(runner, "load_stage", lambda name: classes[name])
    Recorder.calls = []
    Recorder.crash_in = None
    return Recorder


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


def run(spec_path: Path, workdir: Path, *overrides: str, **kwargs: Any) -> list[str]:
    lines: list[str] = []
    runner.run_spec(load_spec(spec_path, overrides), workdir, echo=lines.append, **kwargs)
    return lines


def test_runs_declared_stages_in_order_then_skips_them(stages, spec_path, tmp_path):
    workdir = tmp_path / "run"
    run(spec_path, workdir)
    assert stages.calls == ["curate", "describe", "generate", "pairs"]
    resolved = yaml.safe_load((workdir / "spec.resolved.yaml").read_text())
    assert Spec.model_validate(resolved).name == "t"
    stages.calls.clear()
    lines = run(spec_path, workdir)
    assert stages.calls == []
    assert sum("skip (already done" in line for line in lines) == 4


def test_changed_section_reruns_that_stage_and_later_ones_only(stages, spec_path, tmp_path):
    workdir = tmp_path / "run"
    run(spec_path, workdir)
    stages.calls.clear()
    lines = run(spec_path, workdir, "generate.strong.sampling.temperature=0.1")
    assert stages.calls == ["generate", "pairs"]
    assert any("generate: start (spec section(s) generate changed)" in line for line in lines)
    assert any("pairs: start (upstream stage generate changed)" in line for line in lines)
    # Stale outputs were discarded, not appended to.
    assert len((workdir / "generate" / "out.txt").read_text().splitlines()) == 1


def test_crashed_stage_resumes_in_place(stages, spec_path, tmp_path):
    workdir = tmp_path / "run"
    stages.crash_in = "generate"
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run_spec(load_spec(spec_path), workdir, echo=lines.append)
    assert any("rerun the same command to resume" in line for line in lines)
    assert lines[-1] == f"report: {workdir / 'report.md'}"  # written after a failure too
    assert runner.read_record(runner.RunLayout(workdir), "generate")["status"] == "running"
    stages.calls.clear()
    lines = run(spec_path, workdir)
    assert stages.calls == ["generate (resumed)", "pairs"]
    assert any("generate: resume" in line for line in lines)
    assert runner.read_record(runner.RunLayout(workdir), "generate")["status"] == "done"


def test_only_and_until_select_stages(stages, spec_path, tmp_path):
    workdir = tmp_path / "run"
    run(spec_path, workdir, until="describe")
    assert stages.calls == ["curate", "describe"]
    run(spec_path, workdir, only="generate")
    assert stages.calls[-1] == "generate"
    with pytest.raises(RunError, match=r"reads the output of `generate`.*--until generate"):
        run(spec_path, tmp_path / "fresh", only="pairs")
    with pytest.raises(SpecError, match="either --only or --until"):
        run(spec_path, workdir, only="pairs", until="pairs")
    with pytest.raises(SpecError, match="--only pretrain: the spec declares no such stage"):
        run(spec_path, workdir, only="pretrain")


def test_force_reruns_a_done_stage(stages, spec_path, tmp_path):
    workdir = tmp_path / "run"
    run(spec_path, workdir)
    stages.calls.clear()
    run(spec_path, workdir, only="describe", force=True)
    assert stages.calls == ["describe"]


def test_missing_stage_implementation_fails_before_any_work(spec_path, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "STAGE_IMPLS", {})
    workdir = tmp_path / "run"
    with pytest.raises(RunError, match="stage `curate` is not available"):
        run(spec_path, workdir)
    assert not workdir.exists()


def test_stages_before_a_missing_one_run_then_the_run_stops(stages, spec_path, tmp_path, monkeypatch):
    built = {name: type(f"{name}Stage", (Recorder,), {"name": name}) for name in ("curate", "describe")}

    def load(name: str) -> type[Stage]:
        if name not in built:
            raise RunError(f"stage `{name}` is not available in this version of codepmp")
        return built[name]

    monkeypatch.setattr(runner, "load_stage", load)
    lines: list[str] = []
    with pytest.raises(RunError, match="stage `generate` is not available"):
        runner.run_spec(load_spec(spec_path), tmp_path / "run", echo=lines.append)
    assert stages.calls == ["curate", "describe"]
    assert "running the 2 stage(s) before it" in lines[0]


def test_a_second_run_on_the_same_workdir_is_refused(stages, spec_path, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(workdir / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunError, match="another codepmp run is using"):
            run(spec_path, workdir)
    assert stages.calls == []


def test_workdir_precedence(spec_path, tmp_path, monkeypatch):
    spec = load_spec(spec_path)
    monkeypatch.chdir(tmp_path)
    assert runner.resolve_workdir(spec) == tmp_path / "runs" / "t"
    assert runner.resolve_workdir(spec, "elsewhere") == tmp_path / "elsewhere"
    with_workdir = load_spec(spec_path, ["workdir=out/here"])
    assert runner.resolve_workdir(with_workdir) == spec_path.parent / "out" / "here"


def test_fingerprints_chain_through_upstream_stages(spec_path):
    base = runner.fingerprints(load_spec(spec_path))
    changed = runner.fingerprints(load_spec(spec_path, ["source.limit=4"]))
    assert all(base[stage] != changed[stage] for stage in base)  # curate changed: everything downstream too
    pairs_only = runner.fingerprints(load_spec(spec_path, ["pairs.shards.rows_per_shard=10"]))
    assert [s for s in base if base[s] != pairs_only[s]] == ["pairs"]
