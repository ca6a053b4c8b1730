"""The one way codepmp writes a file or a directory that someone else reads: readers see the old content or the
new, never half of it, and a crash leaves at most a hidden temp file beside the target (`.NAME.*.tmp`).

Every writer in sdk/ and pipelines/ goes through `atomic_path` / `atomic_dir` (or the text/JSON shortcuts):
a temp sibling is written, fsynced, then renamed over the target, and the directory entry is fsynced too, so a
power loss after the rename cannot bring the old file back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

_FILE_MODE = 0o644  # mkstemp makes files private; outputs are meant to be shared like any written file
_DIR_MODE = 0o755


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath, name))
        _fsync_path(Path(dirpath))


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp file path beside `path` for any writer (pyarrow, savefig, gzip); on success it is fsynced and
    renamed over `path`, on error removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _FILE_MODE)
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_path(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success its tree is fsynced and it takes `path`'s place.

    An existing `path` is swapped out by rename and removed only after the new tree is in place, so a crash
    leaves either the old directory or the new one under `path` (plus a hidden `.NAME.*.old` to clean up).
    Callers decide beforehand whether `path` may be replaced at all (`sdk.model.check_save_dir`, `claim_dir`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        tmp.chmod(_DIR_MODE)
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old)  # `old` is an empty dir we just made: rename may replace it
        os.replace(tmp, target)
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_empty_dir(path: Path) -> bool:
    with suppress(FileNotFoundError, NotADirectoryError):
        return next(path.iterdir(), None) is None
    return False


def precious_dirs() -> set[Path]:
    """Directories no codepmp command ever uses as an output directory: the file system root, the user's home,
    the root of the git checkout the command runs in, and the checkout codepmp itself runs from."""
    found = {Path("/"), Path.home().resolve()}
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        repo = next((p for p in (start, *start.parents) if (p / ".git").exists()), None)
        if repo is not None:
            found.add(repo)
    return found


@contextmanager
def atomic_files_into(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success each file written there is fsynced and renamed to the
    same relative place under `path`, and nothing else in `path` is touched; on error the temp dir is removed.

    For a directory that also holds files codepmp did not write, which `atomic_dir` cannot swap out without
    deleting them. Each file is replaced atomically, the set of them is not: callers record what they are about
    to write before leaving the block, so a crash midway leaves nothing they cannot tell apart from the user's.
    """
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        tmp.chmod(_DIR_MODE)
        yield tmp
        _fsync_tree(tmp)
        for dirpath, _, files in os.walk(tmp):
            into = target / Path(dirpath).relative_to(tmp)
            into.mkdir(exist_ok=True)
            for name in files:
                os.replace(Path(dirpath, name), into / name)
            _fsync_path(into)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
