"""Runner mechanics: stage order, skip-if-done, resume after a crash, rerun on change, selection, locking.

The stages here are small stand-ins that only write files: they check the orchestration, not the work.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from pipelines import runner
from pipelines import stages as pipeline
from pipelines.spec import Spec, load_spec
from pipelines.stage import Stage
from sdk.errors import RunError, SpecError
from tests.logs import logged

HOLD_LOCK = (  # what `workdir_lock` does, in another process
    "import fcntl, sys, os, time\n"
    "h = open(sys.argv[1], 'a+'); fcntl.lockf(h, fcntl.LOCK_EX)\n"
    "h.seek(0); h.truncate(); h.write(f'{os.getpid()}\\n')\n"
    "h.flush(); print('locked', flush=True); time.sleep(60)\n"
)
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
            handle.write(f"{self.name}:{self.section_hash(self.spec)}\n")
        type(self).calls.append(self.name + (" (resumed)" if resumed else ""))
        if type(self).crash_in == self.name:
            type(self).crash_in = None
            raise RuntimeError("simulated crash")
        return {"lines": len(out.read_text().splitlines())}


@pytest.fixture
def stages(monkeypatch: pytest.MonkeyPatch) -> type[Recorder]:
    """Every stage's metadata (sections, upstream) with a Recorder's `run`."""
    fakes = tuple(type(f"{cls.__name__}Recorder", (Recorder, cls), {}) for cls in pipeline.PIPELINE)
    monkeypatch.setattr(pipeline, "PIPELINE", fakes)
    Recorder.calls = []
    Recorder.crash_in = None
    return Recorder


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


def run(spec_path: Path, workdir: Path, *overrides: str, **kwargs: Any) -> list[str]:
    with logged() as lines:
        runner.run_spec(load_spec(spec_path, overrides), workdir, **kwargs)
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


def test_progress_goes_to_the_pipelines_logger_which_a_library_caller_can_silence(stages, spec_path, tmp_path, capfd):
    """Progress is logged, never printed: a caller of `run_spec` decides where it goes (the CLI prints it)."""
    logger = logging.getLogger("pipelines")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        runner.run_spec(load_spec(spec_path), tmp_path / "quiet")
    finally:
        logger.setLevel(level)
    assert stages.calls == ["curate", "describe", "generate", "pairs"]
    assert capfd.readouterr() == ("", "")
    lines = run(spec_path, tmp_path / "loud")
    assert lines[0].startswith("run t: 4 stage(s)") and lines[-1].startswith("report: ")


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
    with logged() as lines, pytest.raises(RuntimeError, match="simulated crash"):
        runner.run_spec(load_spec(spec_path), workdir)
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


def test_a_spec_without_stages_is_refused_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(SpecError, match="the spec declares no stage"):
        runner.run_spec(Spec(name="t"), workdir)
    assert not workdir.exists()


def test_a_second_run_on_the_same_workdir_is_refused(stages, spec_path, tmp_path):
    workdir = tmp_path / "run"
    run(spec_path, workdir, until="curate")
    stages.calls.clear()
    holder = subprocess.Popen(  # another process holds the run's lock, as a live `codepmp run` does
        [sys.executable, "-c", HOLD_LOCK, str(workdir / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"another codepmp run \(pid {holder.pid}\) is using"):
            run(spec_path, workdir)
    finally:
        holder.kill()
        holder.wait()
    assert stages.calls == []
    lines = run(spec_path, workdir)  # the holder died: its lock went with it
    assert f"note: taking over the lock of an earlier run (pid {holder.pid}) that is gone" in lines
    assert stages.calls == ["describe", "generate", "pairs"]


def test_the_same_process_cannot_run_twice_on_one_workdir(stages, spec_path, tmp_path):
    workdir = tmp_path / "run"
    run(spec_path, workdir, until="curate")
    with runner.workdir_lock(workdir), pytest.raises(RunError, match="another codepmp run"):
        run(spec_path, workdir)


@pytest.mark.parametrize("place", ["curate", "report.md", "notes.txt"])
def test_a_directory_that_is_not_a_codepmp_run_is_refused_untouched(stages, spec_path, tmp_path, place):
    workdir = tmp_path / "mine"
    precious = workdir / place / "thesis.tex" if place == "curate" else workdir / place
    precious.parent.mkdir(parents=True, exist_ok=True)
    precious.write_text("years of work")
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    with pytest.raises(SpecError, match=rf"workdir {workdir}: not empty and not a codepmp run \(it holds {place}\)"):
        run(spec_path, workdir)
    assert precious.read_text() == "years of work"
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before  # not even a lock file
    assert stages.calls == []


def test_root_home_and_repository_root_are_refused(stages, spec_path, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    monkeypatch.chdir(repo)
    for workdir in (Path("/"), home, repo):
        with pytest.raises(SpecError, match=f"workdir {workdir}: refusing to use /, the home directory"):
            run(spec_path, workdir)
    assert sorted(p.name for p in home.iterdir()) == [] and sorted(p.name for p in repo.iterdir()) == [".git"]
    assert stages.calls == []


def test_a_new_or_empty_directory_becomes_a_run_and_stays_one(stages, spec_path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run(spec_path, empty, until="curate")
    assert (empty / runner.MARKER).is_file()
    (empty / "my-notes.txt").write_text("a user's file beside the run")
    run(spec_path, empty, only="curate", force=True)  # a marked run accepts files the user added
    assert (empty / "my-notes.txt").read_text() == "a user's file beside the run"
    assert stages.calls == ["curate", "curate"]


def test_an_unwritable_workdir_is_one_clear_error(stages, spec_path, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SpecError, match="exists and is not a directory"):
        run(spec_path, afile)
    with pytest.raises(SpecError, match="cannot write there"):
        run(spec_path, afile / "run")


@pytest.mark.parametrize("damage", ["delete", "truncate", "modify"])
def test_a_done_stage_whose_outputs_changed_reruns_and_says_why(stages, spec_path, tmp_path, damage):
    workdir = tmp_path / "run"
    run(spec_path, workdir)
    out = workdir / "describe" / "out.txt"
    if damage == "delete":
        out.unlink()
    elif damage == "truncate":
        out.write_text("")
    else:
        out.write_text(out.read_text().upper())
        os.utime(out, ns=(1, 1))
    stages.calls.clear()
    lines = run(spec_path, workdir)
    reason = {"delete": "is missing", "truncate": "is 0 bytes, was", "modify": "was modified"}[damage]
    assert any(
        f"describe: start (its outputs changed since it finished: describe/out.txt {reason}" in line for line in lines
    )
    assert any("generate: start (upstream stage describe was rebuilt since)" in line for line in lines)
    assert stages.calls == ["describe", "generate", "pairs"]
    stages.calls.clear()
    run(spec_path, workdir)
    assert stages.calls == []


def test_a_stage_whose_upstream_outputs_changed_refuses_to_run_alone(stages, spec_path, tmp_path):
    workdir = tmp_path / "run"
    run(spec_path, workdir, until="describe")
    (workdir / "curate" / "out.txt").unlink()
    with pytest.raises(RunError, match=r"reads the output of `curate`, but its outputs changed.*--until curate"):
        run(spec_path, workdir, only="describe")


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]"])
def test_a_corrupt_stage_record_reruns_that_stage(stages, spec_path, tmp_path, content):
    workdir = tmp_path / "run"
    run(spec_path, workdir)
    (workdir / "generate" / "_stage.json").write_text(content)
    stages.calls.clear()
    lines = run(spec_path, workdir)
    assert any("generate: start (its record generate/_stage.json is unreadable)" in line for line in lines)
    assert stages.calls == ["generate", "pairs"]


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
