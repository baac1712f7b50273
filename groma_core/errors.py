"""Exceptions that groma-core raises for problems a user can fix; the CLI prints them as one line."""

from __future__ import annotations


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
        plural = "s" if len(problems) != 1 else ""
        super().__init__(f"{source}: {len(problems)} problem{plural}\n" + "\n".join(f"  {p}" for p in problems))


class CheckpointError(GromaError):
    """A checkpoint is missing tensors, has unknown or misshapen ones, or cannot be read."""


class InputError(GromaError, ValueError):
    """Bad user input: an image that cannot be read, a malformed box, a prompt that does not match its boxes."""
