"""An engine outlives its stage only for a next stage that loads the same model spec first.

Fake engine builds (mechanics only): which engine each use gets, what is built, and what is closed when.
The real path (describe's engine serving generate's strong model) is tests/test_cluster_generation.py's 1-task
reference, whose files must equal those of Slurm and Ray tasks that each built their own engines.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pipelines import runner, stages
from pipelines.spec import load_spec
from pipelines.stage import Stage
from sdk import engine as engine_module
from sdk.config import ModelSpec
from sdk.engine import Generator, close_idle, leave_idle, open_generator

A, B = ModelSpec(name="model-a"), ModelSpec(name="model-b")


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Builds and shutdowns in order, as `build <model>` / `close <model>#<n>`; no engine idle before or after."""
    log: list[str] = []
    count = iter(range(1, 100))

    def build(self: Generator) -> Any:
        label = f"{self.spec.name}#{next(count)}"
        log.append(f"build {label}")
        core = types.SimpleNamespace(shutdown=lambda: log.append(f"close {label}"))
        return types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=core), get_tokenizer=lambda: None)

    monkeypatch.setattr(engine_module, "resolve_model", lambda spec: "/models/fake")
    monkeypatch.setattr(Generator, "_build", build)
    monkeypatch.setattr(engine_module, "_idle", None)
    yield log
    assert engine_module._idle is None, "an engine was left open"


def test_an_idle_engine_serves_the_same_spec_and_is_closed_before_another_model_loads(events: list[str]) -> None:
    first = open_generator(A)
    leave_idle(first)
    close_idle(keep=A)
    assert open_generator(A) is first and events == ["build model-a#1"]
    leave_idle(first)
    close_idle(keep=ModelSpec(name="model-a", max_model_len=512))  # same name, other settings: not the same engine
    assert events == ["build model-a#1", "close model-a#1"]
    leave_idle(second := open_generator(A))
    third = open_generator(B)  # the idle engine of another spec goes first
    assert third is not second and events[2:] == ["build model-a#2", "close model-a#2", "build model-b#3"]
    leave_idle(third)
    close_idle()
    assert events[-1] == "close model-b#3"


class EngineStage(Stage):
    """Loads each of `models` in turn, as the describe and generate stages do, recording what it was given."""

    models: ClassVar[tuple[ModelSpec, ...]] = ()
    got: ClassVar[list[tuple[str, Generator]]] = []

    def first_model(self) -> ModelSpec | None:
        return self.models[0] if self.models else None

    def run(self) -> dict[str, Any]:
        for model in self.models:
            generator = open_generator(model)
            type(self).got.append((self.name, generator))
            leave_idle(generator)
        return {}


@pytest.mark.parametrize("strong", [A, B])
def test_the_runner_keeps_an_engine_only_for_the_next_stage_that_loads_it_first(
    events: list[str], strong: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"describe": (A,), "generate": (strong, ModelSpec(name="weak"))}
    fakes = tuple(
        type(f"{cls.__name__}Engines", (EngineStage, cls), {"models": models.get(cls.name, ())})
        for cls in stages.PIPELINE
    )
    monkeypatch.setattr(stages, "PIPELINE", fakes)
    EngineStage.got = []
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "name: t\nsource: {paths: [stdlib], limit: 3}\ndescribe: {model: {name: m}}\n"
        "generate: {strong: {model: {name: a}}, weak: {model: {name: b}}}\npairs: {}\n"
    )
    runner.run_spec(load_spec(spec_path), tmp_path / "run")
    (_, described), (_, strong_gen), (_, weak_gen) = EngineStage.got
    if strong == A:
        assert strong_gen is described
        assert events == ["build model-a#1", "close model-a#1", "build weak#2", "close weak#2"]
    else:
        assert strong_gen is not described
        assert events == [
            "build model-a#1", "close model-a#1", "build model-b#2", "close model-b#2", "build weak#3", "close weak#3"
        ]  # fmt: skip
    assert weak_gen is not strong_gen
