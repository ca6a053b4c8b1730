"""Errors a user can act on: the CLI prints them as one line (no traceback) and exits with `exit_code`."""


class CodepmpError(Exception):
    """Base for expected failures: bad input, missing prerequisites, a stage that cannot proceed."""

    exit_code = 1


class SpecError(CodepmpError):
    """A mistake in a spec, its overrides or the command line (names the file and the field)."""

    exit_code = 2


class RunError(CodepmpError):
    """A run cannot proceed (missing upstream output, workdir in use, a stage failed cleanly)."""


class DataError(CodepmpError):
    """Unusable input data (pairs file, columns, cells, model or tokenizer dir): names the culprit."""
