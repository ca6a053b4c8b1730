"""Executors built from the spec through datatrove's own classes, chained with `depends=`.

There is no cluster here: slurm is exercised up to `sbatch` (a stand-in on PATH records what datatrove
submits), ray up to the executor objects and the clear error when Ray is not installed.
"""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import dill
import pytest
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor

from pipelines.curate.pipeline import CurateLayout, build_executors, build_steps
from pipelines.curate.stage import CurateStage
from pipelines.stage import RunLayout
from sdk.errors import RunError, SpecError
from tests.curate_utils import make_spec, run_curate

SOURCE = {"paths": ["stdlib"], "languages": ["python"], "limit": 10}
STEPS = ["filter", "exact_find", "exact_filter", "minhash_buckets", "minhash_cluster", "minhash_filter"]


def build(tmp_path: Path, executor: dict, **sections: object) -> tuple[list, list]:
    spec = make_spec(tmp_path, SOURCE, executor=executor, **sections)
    layout = CurateLayout(tmp_path / "run" / "curate", tmp_path / "run" / "curate" / "logs")
    steps = build_steps(spec, layout)
    return steps, build_executors(spec, steps, layout)


def test_local_executors_and_dependencies(tmp_path: Path) -> None:
    steps, executors = build(tmp_path, {"kind": "local", "tasks": 4, "workers": 2})
    assert [s.name for s in steps] == STEPS
    assert all(isinstance(e, LocalPipelineExecutor) for e in executors)
    assert [e.tasks for e in executors] == [4, 1, 4, 14, 1, 4]  # buckets: one task per MinHash bucket
    assert [e.workers for e in executors] == [2, 1, 2, 2, 1, 2]
    assert executors[0].depends is None
    assert all(e.depends is prev for prev, e in itertools.pairwise(executors))
    assert [Path(e.logging_dir.path).name for e in executors] == [f"{i:02d}_{s}" for i, s in enumerate(STEPS)]


@pytest.mark.parametrize(
    ("dedup", "expected"),
    [
        ({"exact": {"enabled": False}}, ["filter", "minhash_buckets", "minhash_cluster", "minhash_filter"]),
        ({"minhash": {"enabled": False}}, ["filter", "exact_find", "exact_filter"]),
        ({"exact": {"enabled": False}, "minhash": {"enabled": False}}, ["filter"]),
    ],
)
def test_disabled_dedup_steps_are_left_out(tmp_path: Path, dedup: dict, expected: list[str]) -> None:
    steps, _ = build(tmp_path, {"kind": "local"}, dedup=dedup)
    assert [s.name for s in steps] == expected
    writer = steps[-1].pipeline[-1]
    assert Path(writer.output_folder.path) == tmp_path / "run" / "curate" / "output"


def test_minhash_settings_reach_datatrove(tmp_path: Path) -> None:
    steps, _ = build(
        tmp_path, {"kind": "local"}, dedup={"minhash": {"ngram": 3, "buckets": 10, "hashes_per_bucket": 5, "seed": 7}}
    )
    signature = steps[2].pipeline[-1]
    config = signature.config
    assert (config.n_grams, config.num_buckets, config.hashes_per_bucket, config.seed) == (3, 10, 5, 7)
    assert next(s for s in steps if s.name == "minhash_buckets").tasks == 10


SLURM = {
    "kind": "slurm",
    "partition": "cpu",
    "tasks": 8,
    "workers": 4,
    "time": "02:00:00",
    "cpus_per_task": 2,
    "mem_per_cpu_gb": 3,
    "qos": "high",
    "sbatch_args": {"account": "proj42"},
    "env_command": "source /opt/venv/bin/activate",
}


def test_slurm_executors_from_the_spec(tmp_path: Path) -> None:
    _, executors = build(tmp_path, SLURM)
    assert all(isinstance(e, SlurmPipelineExecutor) for e in executors)
    first = executors[0]
    assert (first.partition, first.time, first.cpus_per_task, first.mem_per_cpu_gb, first.qos) == (
        "cpu", "02:00:00", 2, 3, "high",
    )  # fmt: skip
    assert first.job_name == "curate-test-curate-filter"
    script = first.get_launch_file_contents(first.get_sbatch_args(max_array=8), "launch_pickled_pipeline x.pik")
    assert "#SBATCH --mem-per-cpu=3.0G" not in script
    for line in ("#SBATCH --partition=cpu", "#SBATCH --account=proj42", "#SBATCH --array=0-7%4",
                 "#SBATCH --qos=high", "#SBATCH --mem-per-cpu=3072M", "source /opt/venv/bin/activate"):  # fmt: skip
        assert line in script
    assert [e.tasks for e in executors] == [8, 1, 8, 14, 1, 8]


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `sbatch` that records its arguments and answers like Slurm, with job ids 101, 102, ..."""
    bindir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bindir.mkdir()
    script = bindir / "sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f'n=$(( $(wc -l < "{log}" 2>/dev/null || echo 0) + 101 ))\n'
        f'echo "$n $*" >> "{log}"\n'
        'echo "Submitted batch job $n"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_slurm_submits_the_chain_with_dependencies(tmp_path: Path, fake_sbatch: Path) -> None:
    _, executors = build(tmp_path, SLURM)
    executors[-1].run()  # datatrove launches the dependencies first
    submissions = [line.split() for line in fake_sbatch.read_text().splitlines()]
    step_jobs = [s for s in submissions if any("RUN_OFFSET" in a for a in s)]  # the rest: stats-merging jobs
    assert len(step_jobs) == 6
    assert not any(a.startswith("--dependency") for a in step_jobs[0])
    ids = [s[0] for s in step_jobs]
    for prev, job in zip(ids, step_jobs[1:], strict=False):
        assert f"--dependency=afterok:{prev}" in job
    with open(Path(executors[0].logging_dir.path) / "executor.pik", "rb") as handle:
        assert isinstance(dill.load(handle), SlurmPipelineExecutor)  # what the Slurm task will load


def test_ray_executors_from_the_spec(tmp_path: Path) -> None:
    ray = {"kind": "ray", "tasks": 6, "cpus_per_task": 2, "mem_per_cpu_gb": 1.5, "gpus_per_task": 0}
    _, executors = build(tmp_path, ray)
    assert all(isinstance(e, RayPipelineExecutor) for e in executors)
    assert (executors[0].tasks, executors[0].cpus_per_task, executors[0].mem_per_cpu_gb) == (6, 2, 1.5)
    assert all(e.depends is prev for prev, e in itertools.pairwise(executors))


def test_ray_without_ray_installed_is_a_clear_error(tmp_path: Path) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        spec = make_spec(tmp_path, SOURCE, executor={"kind": "ray"})
        with pytest.raises(RunError, match=r"executor\.kind=ray needs Ray"):
            CurateStage(spec, RunLayout(tmp_path / "run")).run()
    else:
        pytest.skip("Ray is installed")


def test_an_outside_logging_dir_is_cleared_only_when_codepmp_made_it(tmp_path):
    """`executor.logging_dir` points outside the workdir: stale logs there are cleared on a fresh start, which must
    never delete a folder codepmp did not create (before: `rmtree(<logging_dir>/<name>-curate)` on any folder)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "mod.py").write_text("def double(x):\n    return 2 * x\n\n\nprint(double(21))\n")
    logs = tmp_path / "logs"
    theirs = logs / "lg-curate" / "keep.txt"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("someone's results")
    spec = make_spec(
        tmp_path,
        {"paths": [str(tmp_path / "src")]},
        name="lg",
        executor={"kind": "local", "tasks": 1, "workers": 1, "logging_dir": str(logs)},
        dedup={"exact": {"enabled": False}, "minhash": {"enabled": False}},
    )
    with pytest.raises(SpecError, match=r"executor.logging_dir .*lg-curate: not empty and not a codepmp run"):
        run_curate(spec, tmp_path / "run")
    assert theirs.read_text() == "someone's results"
    theirs.unlink()
    run_curate(spec, tmp_path / "run")  # an empty folder is taken, marked, and cleared on the next fresh start
    assert (logs / "lg-curate" / ".codepmp-run").is_file()
    assert any((logs / "lg-curate").rglob("*.log"))
