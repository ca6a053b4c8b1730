"""The input listing of a local source: which files the curate tasks read, decided once, before any work.

Listing up front (instead of every task walking the trees) gives three things: a missing path or an
empty corpus is reported before any task starts; every task shards the same list, so tasks never
disagree; and a resumed run reads exactly the files the crashed one did (the listing is reused).

Each line of the listing is a JSON object {"repo", "root", "path", "license", "blob"?, "size"?}: `path` is
relative to `root`; `blob`/`size` name the git object when the file is read from a git repository's HEAD.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.languages import language_of, normalize_language, resolve_source_path
from pipelines.spec import STDLIB, LocalSource
from sdk.errors import SpecError
from sdk.fileio import atomic_write_json, atomic_write_text

SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})
# Under `stdlib`: installed third-party packages live inside the stdlib dir but are not the stdlib.
STDLIB_SKIPPED_DIRS = SKIPPED_DIRS | {"site-packages", "dist-packages"}
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING", "COPYING.txt")

# (SPDX id, phrases that must all appear), first match wins: most specific first.
_LICENSE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("agpl-3.0", ("gnu affero general public license",)),
    ("lgpl-3.0", ("gnu lesser general public license", "version 3")),
    ("lgpl-2.1", ("gnu lesser general public license",)),
    ("gpl-3.0", ("gnu general public license", "version 3")),
    ("gpl-2.0", ("gnu general public license", "version 2")),
    ("apache-2.0", ("apache license", "version 2.0")),
    ("mpl-2.0", ("mozilla public license", "2.0")),
    ("mit", ("permission is hereby granted, free of charge",)),
    ("bsd-3-clause", ("redistribution and use in source and binary forms", "neither the name")),
    ("bsd-2-clause", ("redistribution and use in source and binary forms",)),
    ("isc", ("permission to use, copy, modify, and/or distribute this software",)),
    ("unlicense", ("this is free and unencumbered software released into the public domain",)),
)


def detect_license(root: Path) -> str | None:
    """SPDX id of the license file at the top of a tree, when it is one of the common ones."""
    for name in LICENSE_FILES:
        try:
            text = (root / name).read_text(encoding="utf-8", errors="replace")[:20_000].lower()
        except OSError:
            continue
        text = " ".join(text.split())
        for spdx, phrases in _LICENSE_MARKERS:
            if all(p in text for p in phrases):
                return spdx
        return None
    return None


def build_listing(source: LocalSource, listing: Path) -> dict[str, Any]:
    """Write the listing of `source` to `listing` (atomically) and return its counts.

    Raises SpecError for a path that does not exist (or is not a git work tree with `git: always`)
    and for an empty corpus, so the user hears about it before any datatrove task runs.
    """
    counts: Counter[str] = Counter()
    lines: list[str] = []
    allowed = {normalize_language(name) for name in source.languages} if source.languages else None  # `Python` ok
    roots = [resolve_source_path(raw) for raw in source.paths]  # every path checked before any is walked
    for raw, root in zip(source.paths, roots, strict=True):
        if _use_git(source, raw, root):
            entries = _git_entries(raw, root, counts)
        else:
            entries = _fs_entries(root, source, counts, STDLIB_SKIPPED_DIRS if raw == STDLIB else SKIPPED_DIRS)
        repo, license_id = _repo_identity(raw, root)
        for rel, git_object in entries:
            if not _is_utf8(rel):  # a name that is not UTF-8 cannot be put in the JSON metadata
                counts["undecodable_name"] += 1
                continue
            language = language_of(rel)
            if language is None:
                counts["not_code"] += 1
                continue
            if allowed is not None and language not in allowed:
                counts["language_not_allowed"] += 1
                continue
            entry = {"repo": repo, "root": str(root), "path": rel, "license": license_id}
            if git_object is not None:
                entry.update(git_object)
            lines.append(json.dumps(entry, ensure_ascii=False))
            if source.limit is not None and len(lines) >= source.limit:
                break
        if source.limit is not None and len(lines) >= source.limit:
            break
    if not lines:
        langs = f" in languages {', '.join(sorted(allowed))}" if allowed else ""
        raise SpecError(
            f"source.paths: no code files{langs} found under {', '.join(source.paths)} "
            f"(skipped: {dict(counts) or 'nothing'}); nothing to curate"
        )
    atomic_write_text(listing, "\n".join(lines) + "\n")
    summary = {"files": len(lines), "skipped": dict(sorted(counts.items()))}
    atomic_write_json(listing.with_suffix(".json"), summary)
    return summary


def _is_utf8(name: str) -> bool:
    """False for file names with bytes that are not UTF-8 (Python decodes them to lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_listing_summary(listing: Path) -> dict[str, Any]:
    return json.loads(listing.with_suffix(".json").read_text())


def _repo_identity(raw: str, root: Path) -> tuple[str, str | None]:
    """A repo name for the metadata and the tree's license (the stdlib is under the PSF license)."""
    if raw == STDLIB:
        return f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib", "psf-2.0"
    base = root if root.is_dir() else root.parent
    return base.name or str(base), detect_license(base)


def _use_git(source: LocalSource, raw: str, root: Path) -> bool:
    if source.git == "never" or raw == STDLIB:
        return False
    is_repo = root.is_dir() and (root / ".git").exists()
    if source.git == "always" and not (is_repo or _inside_work_tree(root)):
        raise SpecError(f"source.paths: {raw} is not a git work tree (source.git is `always`)")
    return is_repo or source.git == "always"


def _inside_work_tree(root: Path) -> bool:
    if not root.is_dir():
        return False
    proc = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--is-inside-work-tree"], capture_output=True, text=True, check=False
    )
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def _git_entries(raw: str, root: Path, counts: Counter[str]) -> list[tuple[str, dict[str, Any] | None]]:
    """(path, {blob, size}) of the regular files tracked in HEAD under `root`, in git's (sorted) order."""
    proc = subprocess.run(
        ["git", "-C", str(root), "ls-tree", "-r", "-z", "-l", "HEAD"], capture_output=True, check=False
    )
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SpecError(f"source.paths: {raw}: cannot list git HEAD: {message[-1] if message else 'git failed'}")
    entries: list[tuple[str, dict[str, Any] | None]] = []
    for record in proc.stdout.split(b"\0"):
        if not record:
            continue
        meta, _, path = record.partition(b"\t")
        mode, kind, oid, size = meta.decode().split()
        if kind != "blob":
            counts["submodule"] += 1
            continue
        if mode == "120000":
            counts["symlink"] += 1
            continue
        entries.append((os.fsdecode(path), {"blob": oid, "size": int(size)}))
    return entries


def _fs_entries(
    root: Path, source: LocalSource, counts: Counter[str], skipped_dirs: frozenset[str]
) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """Regular files under `root` in sorted walk order; symlinks followed only when the spec says so.

    Broken symlinks, symlink loops and unreadable directories are counted, never raised.
    """
    if root.is_file():
        yield root.name, None
        return
    visited: set[tuple[int, int]] = set()

    def unreadable(_err: OSError) -> None:
        counts["unreadable_dir"] += 1

    for dirpath, dirnames, filenames in os.walk(root, followlinks=source.follow_symlinks, onerror=unreadable):
        here = Path(dirpath)
        if source.follow_symlinks:
            info = here.stat()
            if (info.st_dev, info.st_ino) in visited:
                counts["symlink_loop"] += 1
                dirnames[:] = []
                continue
            visited.add((info.st_dev, info.st_ino))
        kept = []
        for name in sorted(dirnames):
            if name.startswith(".") or name in skipped_dirs:
                continue
            if not source.follow_symlinks and (here / name).is_symlink():
                counts["symlink"] += 1
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            file = here / name
            reason = _file_problem(file, source.follow_symlinks)
            if reason:
                counts[reason] += 1
                continue
            yield file.relative_to(root).as_posix(), None


def _file_problem(file: Path, follow_symlinks: bool) -> str | None:
    """Why `file` is not a readable regular file (None when it is one)."""
    try:
        if file.is_symlink() and not follow_symlinks:
            return "symlink"
        mode = os.stat(file).st_mode  # follows links
    except FileNotFoundError:
        return "broken_symlink"
    except OSError as exc:
        return "symlink_loop" if exc.errno == errno.ELOOP else "unreadable"
    return None if stat.S_ISREG(mode) else "not_regular_file"
