"""The `codepmp` command as a user meets it: exit codes, one-line errors, plan and schema output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from cli.main import cli
from pipelines import runner
from tests.test_spec import MALFORMED, SHIPPED

REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_validate_accepts_shipped_specs(path: Path):
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_plan_prints_the_graph_and_nonzero_estimates(path: Path, tmp_path: Path):
    text = invoke("plan", str(path), "--workdir", str(tmp_path))
    assert text.exit_code == 0, text.output
    for stage in ("curate", "describe", "generate", "pairs", "pretrain", "finetune", "evaluate"):
        assert f". {stage}" in text.output
    assert "GPU-hours" in text.output and "assumptions:" in text.output
    plan = json.loads(invoke("plan", str(path), "--json", "--workdir", str(tmp_path)).output)
    totals = plan["totals"]
    assert totals["input_tokens"] > 0 and totals["generated_tokens"] > 0 and totals["train_tokens"] > 0
    assert totals["gpu_hours"] > 0 and totals["cpu_hours"] > 0
    by_stage = {s["stage"]: s for s in plan["stages"]}
    assert by_stage["curate"]["documents"] > 0 and by_stage["pairs"]["documents"] > 0
    assert by_stage["pairs"]["writes"][0].startswith(str(tmp_path / "pairs"))


def test_paper_plan_is_at_paper_scale():
    plan = json.loads(invoke("plan", str(REPO / "specs" / "github_19b.yaml"), "--json").output)
    stages = {s["stage"]: s for s in plan["stages"]}
    assert 20e6 <= stages["pairs"]["documents"] <= 35e6  # ~28M pairs
    assert 10e9 <= stages["pretrain"]["train_tokens"] <= 100e9
    assert 500 <= plan["totals"]["gpu_hours"] <= 50_000


def test_plan_reflects_overrides(tmp_path: Path):
    spec = str(REPO / "specs" / "ci_small.yaml")
    small = json.loads(invoke("plan", spec, "--json").output)
    big = json.loads(invoke("plan", spec, "--json", "--set", "generate.strong.sampling.max_new_tokens=2000").output)
    assert big["totals"]["generated_tokens"] > small["totals"]["generated_tokens"]


def test_schema_is_valid_json_schema_for_the_shipped_specs():
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in SHIPPED:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_specs_exit_2_with_one_line(tmp_path: Path, case: str):
    text, fragment = MALFORMED[case]
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    for command in ("validate", "plan", "run"):
        result = invoke(command, str(path))
        assert result.exit_code == 2, (command, result.output)
        assert fragment in result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1
        assert "Traceback" not in result.output


def test_object_tag_via_cli_runs_nothing(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: t\nsource: !!python/object/apply:os.system ['touch {marker}']\n")
    result = invoke("run", str(path), "--workdir", str(tmp_path / "run"))
    assert result.exit_code == 2 and "YAML tag not allowed" in result.output
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_command_line_mistakes_exit_2(tmp_path: Path):
    spec = str(REPO / "specs" / "ci_small.yaml")
    unknown_stage = invoke("run", spec, "--only", "train")
    assert unknown_stage.exit_code == 2 and "Invalid value for '--only'" in unknown_stage.output
    missing = invoke("validate", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and "spec file not found" in missing.output
    bad_set = invoke("validate", spec, "--set", "novalue")
    assert bad_set.exit_code == 2 and "expected dotted.key=value" in bad_set.output
    both = invoke("run", spec, "--only", "pairs", "--until", "pairs", "--workdir", str(tmp_path))
    assert both.exit_code == 2 and "either --only or --until" in both.output


def test_console_script_exit_codes_in_a_real_process(tmp_path: Path):
    """Exit codes and stderr as a shell sees them (not only through click's test runner)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nexecutor: {kind: local, tasks: 0}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "validate", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: executor.tasks: must be > 0"
    ok = subprocess.run(
        [sys.executable, "-m", "cli.main", "validate", str(REPO / "specs" / "local_demo.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr


def test_help_texts_name_the_commands():
    result = invoke("--help")
    for command in ("validate", "plan", "schema", "run"):
        assert command in result.output
    run_help = invoke("run", "--help").output
    assert "--only" in run_help and "--until" in run_help and "--set" in run_help


def _read_only(directory: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `command` with `directory` bind-mounted read-only in a private mount namespace (root only)."""
    script = f'mount --bind -o ro "{directory}" "{directory}" && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("existing_run", [False, True], ids=["empty", "earlier-run"])
def test_a_read_only_workdir_is_one_error_line_exit_2(tmp_path: Path, existing_run: bool):
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs a private mount namespace (root): unshare -m failed")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: t\nsource: {paths: [stdlib], limit: 3}\n")
    workdir = tmp_path / "run"
    workdir.mkdir()
    if existing_run:
        runner.claim_workdir(workdir)
    result = _read_only(workdir, [sys.executable, "-m", "cli.main", "run", str(spec), "--workdir", str(workdir)])
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: workdir {workdir}: cannot write there (Read-only file system)\n"
    assert "Traceback" not in result.stdout + result.stderr
