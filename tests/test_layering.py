"""Imports point one way: cli -> pipelines -> sdk.

`sdk/` (the reward-model SDK, the generation engine, the model registry) must stand alone: a user's
`from sdk import RewardModel` may not pull in the data engine or the CLI. `pipelines/` may use `sdk/` but not the
CLI. The check parses (never imports) every module, so an import hidden in a function, under `TYPE_CHECKING` or
behind `importlib.import_module("...")` counts as much as one at the top of the file.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> the packages it must not import (the layers above it)
FORBIDDEN = {"sdk": ("pipelines", "cli"), "pipelines": ("cli",)}
_DYNAMIC = {"import_module", "__import__"}  # importlib.import_module("x") / __import__("x")


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `tree`, at any depth; relative imports are skipped (they
    stay inside their own package)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name in _DYNAMIC and isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def violations(root: Path) -> tuple[list[str], int]:
    """`path:line: imports module (package must not import above)` for every offending import under `root`,
    and the number of modules scanned."""
    found: list[str] = []
    scanned = 0
    for package, above in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            scanned += 1
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, module in sorted(imported_modules(tree)):
                top = module.split(".")[0]
                if top in above:
                    where = path.relative_to(root)
                    found.append(f"{where}:{line}: imports {module} ({package}/ must not import {', '.join(above)})")
    return found, scanned


def test_layers_import_one_way():
    found, scanned = violations(REPO)
    assert scanned > 20, f"only {scanned} modules found under {', '.join(FORBIDDEN)}: is REPO right?"
    assert not found, "imports against the layering cli -> pipelines -> sdk:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("sdk", "import pipelines\n"),
        ("sdk", "import pipelines.engine as engine\n"),
        ("sdk", "from pipelines import spec\n"),
        ("sdk", "from pipelines.errors import DataError\n"),
        ("sdk", "def f():\n    from pipelines.spec import ModelSpec\n    return ModelSpec\n"),
        ("sdk", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipelines.spec import Spec\n"),
        ("sdk", "import importlib\nengine = importlib.import_module('pipelines.engine')\n"),
        ("sdk", "from cli.main import main\n"),
        ("pipelines", "import cli.main\n"),
        ("pipelines", "class A:\n    def f(self):\n        from cli import main\n"),
    ],
)
def test_the_check_catches(tmp_path: Path, package: str, source: str):
    """The checker is not vacuous: each form of a forbidden import is reported with its file and line."""
    for name in FORBIDDEN:
        (tmp_path / name).mkdir()
    (tmp_path / package / "fine.py").write_text("import json\nfrom sdk.config import StrictModel\nfrom . import x\n")
    (tmp_path / package / "bad.py").write_text("import os\n\n" + source)
    found, scanned = violations(tmp_path)
    assert scanned == 2
    assert len(found) == 1 and found[0].startswith(f"{package}/bad.py:"), found
    line = int(found[0].split(":")[1])
    assert "pipelines" in source.splitlines()[line - 3] or "cli" in source.splitlines()[line - 3]
