"""Language detection by file extension, and the special `stdlib` source path.

The table covers the most common GitHub languages (GitHub's language rankings / The Stack's list).
Names are lowercase and match the `languages` allowlist in the spec.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipelines.spec import STDLIB
from sdk.errors import SpecError

LANGUAGE_BY_EXTENSION: dict[str, str] = {
    ".py": "python",
    ".pyi": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".java": "java",
    ".c": "c",
    ".h": "c",
    ".cc": "c++",
    ".cpp": "c++",
    ".cxx": "c++",
    ".hpp": "c++",
    ".hh": "c++",
    ".hxx": "c++",
    ".cs": "c#",
    ".go": "go",
    ".rs": "rust",
    ".rb": "ruby",
    ".php": "php",
    ".swift": "swift",
    ".kt": "kotlin",
    ".kts": "kotlin",
    ".scala": "scala",
    ".sh": "shell",
    ".bash": "shell",
    ".zsh": "shell",
    ".lua": "lua",
    ".pl": "perl",
    ".pm": "perl",
    ".r": "r",
    ".m": "objective-c",
    ".mm": "objective-c",
    ".dart": "dart",
    ".hs": "haskell",
    ".jl": "julia",
    ".sql": "sql",
    ".html": "html",
    ".htm": "html",
    ".css": "css",
    ".scss": "css",
    ".vue": "vue",
    ".ps1": "powershell",
    ".ex": "elixir",
    ".exs": "elixir",
    ".erl": "erlang",
    ".clj": "clojure",
    ".f90": "fortran",
    ".f": "fortran",
    ".groovy": "groovy",
    ".ml": "ocaml",
    ".zig": "zig",
    ".tf": "hcl",
    ".hcl": "hcl",
    ".vb": "visual basic",
    ".asm": "assembly",
    ".s": "assembly",
}

KNOWN_LANGUAGES = frozenset(LANGUAGE_BY_EXTENSION.values())


# Dataset spellings (The Stack `lang`, github-code `language`) that do not lowercase to our names.
LANGUAGE_ALIASES: dict[str, str] = {
    "batchfile": "shell",
    "bash": "shell",
    "cpp": "c++",
    "csharp": "c#",
    "golang": "go",
    "js": "javascript",
    "objective-c++": "objective-c",
    "ts": "typescript",
}


def language_of(path: str | os.PathLike[str]) -> str | None:
    return LANGUAGE_BY_EXTENSION.get(Path(path).suffix.lower())


def normalize_language(name: object) -> str | None:
    """A dataset's language label in this table's spelling (`Python` -> `python`, `C#` -> `c#`)."""
    if not isinstance(name, str) or not name.strip():
        return None
    key = name.strip().lower()
    return LANGUAGE_ALIASES.get(key, key)


def stdlib_dir() -> Path:
    """The running Python's standard library: real code present on every machine."""
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_source_path(path: str) -> Path:
    """A spec source path on disk (`stdlib` expanded); a missing path is an error before any work."""
    resolved = stdlib_dir() if path == STDLIB else Path(path)
    if not resolved.exists():
        raise SpecError(f"source.paths: {path} does not exist")
    return resolved


def iter_source_files(paths: Iterable[str], languages: Iterable[str] | None = None) -> Iterator[Path]:
    """Regular files under the source paths whose language is allowed (no symlinks followed)."""
    allowed = set(languages) if languages else None
    for raw in paths:
        root = resolve_source_path(raw)
        candidates = [root] if root.is_file() else _walk(root)
        for file in candidates:
            language = language_of(file)
            if language is not None and (allowed is None or language in allowed):
                yield file


def _walk(root: Path) -> Iterator[Path]:
    # Third-party packages installed inside the stdlib dir are not the stdlib (the curate listing agrees).
    skipped = {"__pycache__", "site-packages", "dist-packages"} if root == stdlib_dir() else {"__pycache__"}
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _err: None):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skipped)
        for name in sorted(filenames):
            file = Path(dirpath) / name
            if not file.is_symlink() and file.is_file():
                yield file


def count_source_files(
    paths: Iterable[str], languages: Iterable[str] | None = None, size_bounds: tuple[int, int] | None = None
) -> tuple[int, int, int]:
    """(files read, files within size_bounds, bytes of those): what `plan` reports for local corpora."""
    files = kept = total = 0
    for file in iter_source_files(paths, languages):
        try:
            size = file.stat().st_size
        except OSError:
            continue
        files += 1
        if size_bounds is None or size_bounds[0] <= size <= size_bounds[1]:
            kept += 1
            total += size
    return files, kept, total
