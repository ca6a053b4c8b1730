"""Code extraction from generator replies: fences, several blocks, unclosed fences, replies without fences."""

from __future__ import annotations

from pipelines.pairs.extract import extract_code, looks_like_code, parses, python_parses
from tests.pairs_helpers import STRONG_REPLY


def test_single_fenced_block_drops_surrounding_prose() -> None:
    got = extract_code(STRONG_REPLY)
    assert got.kind == "fenced" and got.blocks == 1 and not got.unclosed
    assert got.content.startswith("def merge_intervals(")
    assert got.content.endswith("return merged")
    assert "O(n log n)" not in got.content and "Here is" not in got.content


def test_several_blocks_keep_the_language_and_unlabelled_ones_in_order() -> None:
    reply = (
        "Install the dependency first:\n\n```bash\npip install requests\n```\n\n"
        "Then the client:\n\n```python\nimport requests\n\n\n"
        "def fetch(url):\n    return requests.get(url).text\n```\n\n"
        "And a usage example:\n\n```\nprint(fetch('https://example.org'))\n```\n"
    )
    got = extract_code(reply, "python")
    assert got.blocks == 3
    assert "pip install" not in got.content
    assert got.content.index("def fetch") < got.content.index("print(fetch(")
    assert python_parses(got.content)


def test_aliases_label_the_same_language() -> None:
    for label in ("py", "python3", "Python", "{.python}"):
        got = extract_code(f"```{label}\nx = 1\n```\n```sh\nls\n```", "python")
        assert got.content == "x = 1", label


def test_blocks_of_other_languages_are_kept_when_none_match() -> None:
    got = extract_code("```javascript\nconst x = 1;\n```", "python")
    assert got.kind == "fenced" and got.content == "const x = 1;"


def test_unclosed_fence_at_the_token_limit_runs_to_the_end() -> None:
    reply = "```python\ndef area(radius):\n    import math\n    return math.pi * radius *"
    got = extract_code(reply)
    assert got.unclosed and got.kind == "fenced"
    assert got.content.endswith("math.pi * radius *")
    assert parses(got, "python") is False


def test_tilde_fences_and_longer_closing_fences() -> None:
    got = extract_code("~~~python\nx = [1, 2]\n~~~~\n\nDone.")
    assert got.content == "x = [1, 2]" and not got.unclosed
    # A backtick line inside a tilde block is code, not a closing fence.
    got = extract_code("~~~\ns = '''\n```\n'''\n~~~")
    assert got.content == "s = '''\n```\n'''"


def test_an_empty_fence_is_empty() -> None:
    assert extract_code("```python\n```").kind == "empty"
    assert extract_code("Here you go:\n```python\n\n   \n```\n").kind == "empty"
    assert extract_code("   \n\n").kind == "empty"
    assert extract_code("").kind == "empty"


def test_reply_without_fence_that_parses_is_code() -> None:
    reply = "def add(a, b):\n    return a + b\n"
    got = extract_code(reply)
    assert got.kind == "bare_code" and got.has_code
    assert parses(got, "python") is True


def test_prose_without_fence_is_text_even_when_it_happens_to_parse() -> None:
    for reply in ("Sure", "I cannot help with that request because it is unclear what the code should do."):
        got = extract_code(reply)
        assert got.kind == "text", reply
        assert parses(got, "python") is False


def test_code_looking_reply_in_another_language_is_code() -> None:
    reply = "function add(a, b) {\n  return a + b;\n}\n\nconsole.log(add(1, 2));\n"
    assert looks_like_code(reply)
    got = extract_code(reply, "javascript")
    assert got.kind == "bare_code"
    assert parses(got, "javascript") is None  # no JavaScript parser at hand: unknown, not False


def test_broken_python_without_fence_but_code_shaped_is_code_that_does_not_parse() -> None:
    reply = "def add(a, b)\n    return a + b\n"
    got = extract_code(reply)
    assert got.kind == "bare_code"
    assert parses(got, "python") is False


def test_invalid_escape_warning_still_parses() -> None:
    assert python_parses('import re\nPATTERN = re.compile("\\d+")\n')
