"""Every spec field is read by some code: a field that is silently ignored is a bug.

`StrictModel` refuses unknown keys so a typo never goes unnoticed; this test closes the other half of that
promise. A field the spec accepts, validates and documents, but that no stage, SDK or CLI code ever reads,
lets a user set a knob that does nothing (and hashes into skip-if-done keys as if it mattered).

The check is static and name-based. It walks every Pydantic model reachable from `pipelines.spec.Spec`, then
parses (never imports) every module under pipelines/, sdk/ and cli/ except the two that declare and validate the
spec (pipelines/spec.py, sdk/config.py: reading a field only in its own validator is not a use). A field counts
as read when its name appears there as an attribute (`x.name`), as a whole string constant (`getattr(x,
"name")`, a key of a dumped dict), or when its model is dumped wholesale by a consumer (`f.section.model_dump(...)`
credits the direct fields of the model(s) stored in `section`). Being name-based it can miss an unread field
whose name is also used for something else, but it never flags a field that is really read.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, get_args

from pydantic import BaseModel

from pipelines.spec import Spec
from sdk.config import StrictModel

REPO = Path(__file__).resolve().parents[1]
CONSUMER_DIRS = ("pipelines", "sdk", "cli")
DECLARING = (Path("pipelines/spec.py"), Path("sdk/config.py"))  # where fields are declared and validated
HINT = "implement it or remove it from the spec"


class Evidence(NamedTuple):
    """Why an allow-listed field is read although no consumer module names it; `needle` must be in `path`."""

    path: str
    needle: str
    why: str


# Fields legitimately consumed inside pipelines/spec.py itself. Keep it small: each entry's evidence is checked,
# and an entry that is no longer needed (a consumer now reads the field) fails the test so it is removed.
ALLOWED: dict[tuple[str, str], Evidence] = {
    ("GenerateSpec", "allow_same_model"): Evidence(
        "pipelines/spec.py",
        "if not self.allow_same_model:",
        "a validation switch: its whole effect is relaxing GenerateSpec._distinct_models",
    ),
}


# --------------------------------------------------------------------------- the spec tree


def models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """Model classes inside an annotation: Optional, unions, Annotated (incl. discriminated unions), list/dict."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in get_args(annotation):
        yield from models_in(arg)


def reachable_models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """Every model class reachable from `root` through field annotations, `root` first."""
    seen: list[type[BaseModel]] = []
    todo = [root]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            todo.extend(models_in(field.annotation))
    return seen


def declaring_class(model: type[BaseModel], name: str) -> type[BaseModel]:
    """The class that declares (or last re-declares) field `name`, so inherited fields are reported once."""
    for cls in model.__mro__:
        if name in vars(cls).get("__annotations__", {}):
            return cls
    return model


@dataclass(frozen=True)
class SpecField:
    owner: type[BaseModel]
    name: str
    annotation: Any

    @property
    def label(self) -> str:
        return f"{self.owner.__name__}.{self.name}"


def spec_fields(root: type[BaseModel]) -> list[SpecField]:
    """(declaring model, field) for every field of every model reachable from `root`, deduplicated."""
    out: dict[tuple[type[BaseModel], str], SpecField] = {}
    for model in reachable_models(root):
        for name, field in model.model_fields.items():
            owner = declaring_class(model, name)
            out.setdefault((owner, name), SpecField(owner, name, field.annotation))
    return list(out.values())


# --------------------------------------------------------------------------- what the code reads


@dataclass(frozen=True)
class Reads:
    names: frozenset[str]  # attribute names and whole string constants
    dumped: frozenset[str]  # `section` in `<...>.section.model_dump(...)`


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of docstring nodes: prose that mentions a field is not code that reads it."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def scan(paths: Iterable[Path]) -> Reads:
    names: set[str] = set()
    dumped: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _docstrings(tree)
        fstring_parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif (
                isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip | fstring_parts
            ):
                names.add(node.value)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "model_dump"
                and isinstance(node.func.value, ast.Attribute)
            ):
                dumped.add(node.func.value.attr)
    return Reads(frozenset(names), frozenset(dumped))


def consumer_files() -> list[Path]:
    files = sorted(p for d in CONSUMER_DIRS for p in (REPO / d).rglob("*.py"))
    return [p for p in files if p.relative_to(REPO) not in DECLARING]


def unread_fields(root: type[BaseModel], reads: Reads, allowed: Iterable[tuple[str, str]] = ()) -> list[str]:
    """`Model.field` labels of fields of `root`'s tree that `reads` never touches (minus `allowed`)."""
    fields = spec_fields(root)
    dumped_models = {m for f in fields if f.name in reads.dumped for m in models_in(f.annotation)}
    dumped_fields = {(declaring_class(m, n), n) for m in dumped_models for n in m.model_fields}
    allow = set(allowed)
    return sorted(
        f.label
        for f in fields
        if f.name not in reads.names
        and (f.owner, f.name) not in dumped_fields
        and (f.owner.__name__, f.name) not in allow
    )


def _report(unread: list[str]) -> str:
    lines = "\n".join(f"  {label}: {HINT}" for label in unread)
    return (
        f"{len(unread)} spec field(s) are read by no code under {', '.join(d + '/' for d in CONSUMER_DIRS)}:\n{lines}"
    )


# --------------------------------------------------------------------------- tests


def test_every_spec_field_is_read() -> None:
    unread = unread_fields(Spec, scan(consumer_files()), ALLOWED)
    assert not unread, _report(unread)


def test_walk_covers_the_whole_tree() -> None:
    """The walk reaches discriminated-union members, TrainConfig subclasses and nested sections."""
    names = {m.__name__ for m in reachable_models(Spec)}
    assert names >= {
        "LocalExecutor",
        "SlurmExecutor",
        "RayExecutor",
        "LocalSource",
        "HuggingFaceSource",
        "FileShardSource",
        "ColumnMap",
        "SizeHint",
        "EncodedDataFilter",
        "MinhashDedup",
        "PruneSpec",
        "SamplingSpec",
        "PretrainSpec",
        "FinetuneSpec",
        "HumanEvalExecSpec",
        "BestOfNSpec",
        "SandboxSpec",
    }
    labels = {f.label for f in spec_fields(Spec)}
    assert {"TrainConfig.rm_coef", "FinetuneConfig.lm_coef", "SlurmExecutor.partition", "_Switch.enabled"} <= labels


def test_allow_list_evidence_is_real_and_needed() -> None:
    labels = {(f.owner.__name__, f.name) for f in spec_fields(Spec)}
    reads = scan(consumer_files())
    for (model, field), ev in ALLOWED.items():
        assert (model, field) in labels, f"ALLOWED[{model}.{field}]: no such spec field any more"
        assert ev.needle in (REPO / ev.path).read_text(encoding="utf-8"), (
            f"ALLOWED[{model}.{field}]: {ev.needle!r} is not in {ev.path} any more ({ev.why})"
        )
        assert f"{model}.{field}" in unread_fields(Spec, reads), (
            f"ALLOWED[{model}.{field}]: a consumer reads it now; remove the entry"
        )


def test_checker_flags_a_field_nobody_reads() -> None:
    class Knobs(StrictModel):
        zz_never_read_knob: int = 0
        enabled: bool = True  # read all over pipelines/

    class Root(StrictModel):
        name: str = "x"
        filters: Knobs | None = None  # `filters` is read by the curate stage

    reads = scan(consumer_files())
    assert unread_fields(Root, reads) == ["Knobs.zz_never_read_knob"]
    assert "Knobs.zz_never_read_knob: " + HINT in _report(["Knobs.zz_never_read_knob"])
    # Named as an attribute or a string anywhere in a consumer, it counts as read.
    assert unread_fields(Root, Reads(reads.names | {"zz_never_read_knob"}, reads.dumped)) == []


def test_model_dump_of_a_section_reads_its_direct_fields(tmp_path: Path) -> None:
    class Inner(StrictModel):
        zz_deep_knob: int = 0

    class Section(StrictModel):
        zz_dumped_knob: int = 0
        zz_inner: Inner = Inner()

    class Root(StrictModel):
        zz_section: Section = Section()

    consumer = tmp_path / "consumer.py"
    consumer.write_text("def f(spec):\n    return Step(**spec.zz_section.model_dump(exclude={'unrelated'}))\n")
    # The dumped section's own fields are read; a model nested inside it is not read field by field.
    assert unread_fields(Root, scan([consumer])) == ["Inner.zz_deep_knob"]
    # A dump of a local name (no attribute chain naming a section) credits nothing.
    consumer.write_text("def f(section):\n    return Step(**section.model_dump())\n")
    assert unread_fields(Root, scan([consumer])) == [
        "Inner.zz_deep_knob",
        "Root.zz_section",
        "Section.zz_dumped_knob",
        "Section.zz_inner",
    ]


def test_names_used_only_in_the_declaring_modules_do_not_count() -> None:
    spec_py = scan([REPO / "pipelines" / "spec.py"])
    consumers = scan(consumer_files())
    only_in_spec = sorted(n for n in spec_py.names - consumers.names if n.isidentifier() and not n.startswith("_"))
    assert only_in_spec, "expected some name used only inside pipelines/spec.py"
    name = only_in_spec[0]
    Root = type("Root", (StrictModel,), {"__annotations__": {name: int}, name: 0})
    assert unread_fields(Root, consumers) == [f"Root.{name}"]
    # The same name would pass if spec.py were scanned: excluding it is what catches validator-only reads.
    assert unread_fields(Root, scan([*consumer_files(), REPO / "pipelines" / "spec.py"])) == []
