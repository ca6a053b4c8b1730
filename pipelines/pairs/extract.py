"""Pull the code out of a generator's reply, so checks compare code rather than the chat around it.

The rule is `EXTRACTION_RULE` (quoted verbatim in the dataset card).
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass
from typing import Literal

from pipelines.languages import normalize_language

EXTRACTION_RULE = """\
1. Fenced blocks (```lang or ~~~lang, indented up to 3 spaces) are the code. A fence left open (the generator
   hit its token limit) runs to the end of the reply.
2. With several blocks, those labelled with the pair's language (or an alias such as py/python3) or
   unlabelled are kept and joined by a blank line, in order; when none match, all blocks are kept. This drops
   the `pip install` and console-output blocks that often follow a solution.
3. A reply without fences is code when it parses (Python, via `ast`, with at least one statement that is not
   a bare name or constant: "Sure" parses, but is prose) or when at least 60% of its lines look like code
   (indented, a keyword or comment start, an assignment, or a code-like ending); otherwise it is text, and
   the checks compare it as text.
4. A reply that is blank, or whose blocks are all blank (an empty fence), is empty."""

Kind = Literal["fenced", "bare_code", "text", "empty"]

# Opening or closing fence line: the fence run, then an optional info string (first word = language label).
_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*?)[ \t]*$")

# Labels models put on fences that mean the same language as ours (after `normalize_language`).
_LABEL_ALIASES: dict[str, str] = {
    "py": "python",
    "python3": "python",
    "py3": "python",
    "pycon": "python",
    "ipython": "python",
    "c++": "c++",
    "cc": "c++",
    "rs": "rust",
    "rb": "ruby",
    "kt": "kotlin",
    "sh": "shell",
    "zsh": "shell",
    "console": "shell",
    "shell-session": "shell",
    "jsx": "javascript",
    "tsx": "typescript",
}

# Line starts that mark code in most languages (used only for replies without fences).
_CODE_STARTS = (
    "#",
    "//",
    "/*",
    "*",
    "@",
    "def ",
    "class ",
    "import ",
    "from ",
    "return",
    "if ",
    "elif ",
    "else",
    "for ",
    "while ",
    "try:",
    "except",
    "with ",
    "raise ",
    "yield ",
    "async ",
    "await ",
    "function ",
    "const ",
    "let ",
    "var ",
    "public ",
    "private ",
    "protected ",
    "static ",
    "package ",
    "fn ",
    "func ",
    "impl ",
    "struct ",
    "enum ",
    "use ",
    "namespace ",
    "template",
    "switch",
    "case ",
    "print",
)
_CODE_ENDS = (";", "{", "}", ")", ":", ",", "(", "[", "]")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][\w.\[\]'\"]*\s*(?:[-+*/%|&^]|//|\*\*)?=[^=]")
_CODE_LINE_SHARE = 0.6


@dataclass(frozen=True)
class Extraction:
    """The code found in one reply: `content` is what checks compare (code, or the text when there is none)."""

    content: str
    kind: Kind
    blocks: int = 0  # fenced blocks seen (0 without fences)
    unclosed: bool = False  # the last fence was never closed (typical of a reply cut at the token limit)

    @property
    def has_code(self) -> bool:
        return self.kind in ("fenced", "bare_code")


def _label_language(info: str) -> str | None:
    """The language a fence's info string names (`python`, `py3`, `{.python}` ...), or None when unlabelled."""
    word = info.strip().strip("{}.").split(maxsplit=1)[0].lower() if info.strip() else ""
    if not word:
        return None
    return _LABEL_ALIASES.get(word) or normalize_language(word)


def _fenced_blocks(reply: str) -> tuple[list[tuple[str | None, str]], bool]:
    """(label language, body) of each fenced block, and whether the last one was left open."""
    blocks: list[tuple[str | None, str]] = []
    lines = reply.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening["fence"]
        body: list[str] = []
        i += 1
        closed = False
        while i < len(lines):
            closing = _FENCE.match(lines[i])
            # A closing fence uses the same character, is at least as long and carries no info string.
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"]
            ):
                closed = True
                i += 1
                break
            body.append(lines[i])
            i += 1
        blocks.append((_label_language(opening["info"]), "\n".join(body)))
        if not closed:
            return blocks, True
    return blocks, False


def python_parses(code: str) -> bool:
    """Whether `code` is valid Python (syntax warnings such as invalid escapes do not count as failures)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _python_program(text: str) -> bool:
    """Parses as Python and does something: prose like "Sure." or "Done" also parses, as a bare name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Name | ast.Constant)) for s in tree.body)


def _code_like(line: str) -> bool:
    if line[:1] in (" ", "\t"):
        return True
    stripped = line.strip()
    return stripped.startswith(_CODE_STARTS) or stripped.endswith(_CODE_ENDS) or bool(_ASSIGNMENT.match(stripped))


def looks_like_code(text: str) -> bool:
    """Most non-blank lines look like code: indented, a keyword or comment start, or a code-ish ending."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return False
    return sum(_code_like(line) for line in lines) / len(lines) >= _CODE_LINE_SHARE


def extract_code(reply: str, language: str | None = "python") -> Extraction:
    """Apply the module's rule to one reply; `language` is the pair's language (selects among blocks)."""
    if not reply.strip():
        return Extraction("", "empty")
    blocks, unclosed = _fenced_blocks(reply)
    if blocks:
        matching = [body for label, body in blocks if label is None or label == language]
        chosen = matching or [body for _, body in blocks]
        content = "\n\n".join(body.strip("\n") for body in chosen if body.strip())
        return Extraction(content, "fenced" if content.strip() else "empty", len(blocks), unclosed)
    text = reply.strip("\n")
    if (language == "python" and _python_program(text)) or looks_like_code(text):
        return Extraction(text, "bare_code")
    return Extraction(text.strip(), "text")


def parses(extraction: Extraction, language: str | None) -> bool | None:
    """Whether a side's code parses: Python via `ast`; None (unknown) for languages without a parser here."""
    if language != "python":
        return None
    return extraction.has_code and python_parses(extraction.content)
