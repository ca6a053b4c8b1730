"""The one atomic-write helper: a failed write leaves the old content and no temp file; a replaced directory is
either wholly old or wholly new."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sdk.fileio import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, is_empty_dir, precious_dirs


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_written_files_are_readable_by_others_like_any_output(tmp_path):
    atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
    mode = stat.S_IMODE(os.stat(tmp_path / "a" / "b.json").st_mode)
    assert mode == 0o644
    assert (tmp_path / "a" / "b.json").read_text() == '{\n  "x": 1\n}\n'


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2-partial")
        raise RuntimeError("save died")
    assert (target / "weights").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old copies left
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_empty_and_precious_dirs(tmp_path, monkeypatch):
    assert is_empty_dir(tmp_path) and not is_empty_dir(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    assert not is_empty_dir(tmp_path) and not is_empty_dir(tmp_path / "f")
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "repo" / "sub")
    precious = precious_dirs()
    assert {(tmp_path / "repo").resolve(), Path("/"), Path.home().resolve()} <= precious
