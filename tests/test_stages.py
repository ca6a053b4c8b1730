"""The stage list: every stage class carries its own metadata, and a spec missing a stage's input says what to add."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipelines.spec import Spec, validate_spec
from pipelines.stages import NAMES, PIPELINE, check_inputs
from sdk.errors import SpecError

REPO = Path(__file__).resolve().parents[1]

# The smallest valid section of each stage (the spec section named by `Stage.section`).
ALONE = {
    "source": {"paths": ["stdlib"]},
    "describe": {"model": {"name": "m"}},
    "generate": {"strong": {"model": {"name": "a"}}, "weak": {"model": {"name": "b"}}},
    "pairs": {},
    "pretrain": {"model": "m"},
    "finetune": {"data": "d.jsonl"},
    "evaluate": {},
}


def test_every_stage_declares_what_it_reads_and_writes():
    fields = set(Spec.model_fields)
    assert len(set(NAMES)) == len(NAMES) == len(PIPELINE)
    for cls in PIPELINE:
        assert cls.section in fields, cls.name
        assert set(cls.reads) <= fields and cls.section in cls.reads, cls.name
        assert cls.writes, cls.name


@pytest.mark.parametrize("cls", PIPELINE, ids=NAMES)
def test_a_stage_declared_alone_names_what_to_add(cls, tmp_path):
    spec = validate_spec({"name": "t", cls.section: ALONE[cls.section]}, base_dir=tmp_path)
    assert [c.name for c in PIPELINE if c.declared(spec)] == [cls.name]
    needed = cls.upstream(spec)
    if not needed:
        check_inputs(spec)
        return
    with pytest.raises(SpecError) as info:
        check_inputs(spec)
    assert str(info.value) == cls.feeds[needed[0]]  # every upstream a stage can name has its hint


def test_a_stage_reads_only_stages_before_it():
    """A stage's upstream comes before it: the runner and plan walk the list once, in order."""
    full = validate_spec({"name": "t", **ALONE}, base_dir=REPO)
    seen: list[str] = []
    for cls in PIPELINE:
        assert set(cls.upstream(full)) <= set(seen), cls.name
        seen.append(cls.name)


def test_only_the_cli_imports_the_runner():
    """Stages, the report and the SDK never import the runner: the layers point one way (cli -> runner -> stages)."""
    importers = []
    for path in sorted((REPO / "pipelines").rglob("*.py")) + sorted((REPO / "sdk").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "pipelines.runner" for n in names):
                importers.append(path.relative_to(REPO).as_posix())
    assert importers == []
