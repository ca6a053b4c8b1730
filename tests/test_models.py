"""Model cache mechanics: one lock per cache entry, atomic build (no engine, no weights)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

from sdk import models


def test_each_cache_entry_has_its_own_lock_even_with_dots_in_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CODEPMP_CACHE", str(tmp_path))
    locks: list[Path] = []

    @contextmanager
    def record(path: Path):
        locks.append(path)
        yield

    monkeypatch.setattr(models, "_lock", record)
    for key in ("Qwen2.5-7B-keep13-13", "Qwen2.7-7B-keep13-13"):
        built = models._cached(key, lambda out: (out / "config.json").write_text("{}"))
        assert built == tmp_path / "models" / key and (built / "config.json").is_file()
    assert len(set(locks)) == 2  # with_suffix made both `Qwen2.lock`


def test_a_failed_build_leaves_no_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CODEPMP_CACHE", str(tmp_path))

    def broken(out: Path) -> None:
        (out / "model.safetensors").write_text("half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        models._cached("m", broken)
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []
