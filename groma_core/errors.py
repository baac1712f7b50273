"""Exceptions that groma-core raises for problems a user can fix; the CLI prints them as one line."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable

#: longest echo of a user value (a repr) inside an error message, in characters
MAX_ECHO_CHARS = 80
#: longest line of an error message; longer ones are cut (a guard against echoing huge inputs)
MAX_LINE_CHARS = 500
#: problems of a :class:`RecipeError` shown in its message (all are kept in ``problems``)
MAX_PROBLEMS_SHOWN = 100

_ECHO = reprlib.Repr()
_ECHO.maxlevel = 3
_ECHO.maxstring = _ECHO.maxother = MAX_ECHO_CHARS
_ECHO.maxlong = 40
_ECHO.maxdict = _ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxset = _ECHO.maxfrozenset = _ECHO.maxdeque = 6


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` naming the choice closest to ``name`` (difflib, cutoff 0.6), or "" if none is close:
    the hint every "unknown name" message of the package ends with."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """A short repr of a user value for an error message: at most ``limit`` characters, however large or deeply
    shared (YAML aliases) the value is; a cut repr ends in "...". Strings keep their quotes."""
    try:
        text = _ECHO.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails still gets a message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """``text`` with every character that is not printable (a newline or a terminal escape sequence in a file name)
    written as its Python escape, so that it shows on one line and as it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line(text: object, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` as one line of at most ``limit`` characters: line breaks become spaces, other control characters
    are written as escapes (:func:`printable`), a longer text is cut with "..."."""
    joined = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    cleaned = printable(joined)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


class GromaError(Exception):
    """Base class of every error that the command line shows as one clear line."""


class UnknownPluginError(GromaError, KeyError):
    """A recipe or call named a plugin that is not installed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginConflictError(GromaError):
    """Two distributions registered the same stage name."""


class RecipeError(GromaError):
    """A recipe is invalid; ``problems`` lists every problem, each starting with its dotted path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        where = one_line(source)
        if len(problems) == 1:  # one problem: one line
            message = f"{where}: {one_line(problems[0])}"
        else:
            shown = [f"  {one_line(p)}" for p in problems[:MAX_PROBLEMS_SHOWN]]
            if len(problems) > MAX_PROBLEMS_SHOWN:
                shown.append(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
            message = f"{where}: {len(problems)} problems\n" + "\n".join(shown)
        super().__init__(message)


class CheckpointError(GromaError):
    """A checkpoint is missing tensors, has unknown or misshapen ones, or cannot be read."""


class ProposalError(GromaError, ValueError):
    """A region proposer returned candidates that break the stage contract (shape, NaN, out of range)."""


class InputError(GromaError, ValueError):
    """Bad user input: an image that cannot be read, a malformed box, a prompt that does not match its boxes."""
