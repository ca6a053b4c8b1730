"""The pipeline: every stage class, in order. Adding a stage means writing its class and listing it here;
the runner, the fingerprints, `codepmp plan` and the report loop over this list (each class carries its own
metadata: `pipelines/stage.py`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from pipelines.curate.stage import CurateStage
from pipelines.describe import DescribeStage
from pipelines.evaluate import EvaluateStage
from pipelines.generate import GenerateStage
from pipelines.pairs import PairsStage
from pipelines.spec import Spec, load_spec
from pipelines.stage import Stage
from pipelines.train import FinetuneStage, PretrainStage
from sdk.errors import SpecError

PIPELINE: tuple[type[Stage], ...] = (
    CurateStage,
    DescribeStage,
    GenerateStage,
    PairsStage,
    PretrainStage,
    FinetuneStage,
    EvaluateStage,
)
NAMES: tuple[str, ...] = tuple(cls.name for cls in PIPELINE)


def stage_class(name: str) -> type[Stage]:
    for cls in PIPELINE:
        if cls.name == name:
            return cls
    raise KeyError(name)


def declared(spec: Spec) -> list[type[Stage]]:
    """The stages this spec asks for, in pipeline order."""
    return [cls for cls in PIPELINE if cls.declared(spec)]


def declared_names(spec: Spec) -> list[str]:
    return [cls.name for cls in declared(spec)]


def load(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Spec:
    """`load_spec` plus the checks that need the stages (every stage's inputs declared); errors name the file."""
    spec = load_spec(path, overrides)
    try:
        check_inputs(spec)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    return spec


def check_inputs(spec: Spec) -> None:
    """Every declared stage's upstream stages are declared too; else a SpecError saying what to add."""
    names = declared_names(spec)
    for cls in declared(spec):
        for needed in cls.upstream(spec):
            if needed not in names:
                raise SpecError(cls.feeds[needed])
