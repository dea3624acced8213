"""Errors that stop a command with one clear sentence (exit code 2)."""
from __future__ import annotations

import difflib
from typing import Iterable


class FedforgeError(Exception):
    """A problem with the user's input or environment, reported as one sentence naming the fix."""

    exit_code = 2


class ConfigError(FedforgeError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class DataError(FedforgeError):
    """A dataset file or source is missing, corrupt or inconsistent."""


class PartitionError(FedforgeError):
    """A partition cannot be made (or loaded) as asked."""


class UnknownNameError(ConfigError):
    """A registry lookup failed; the message suggests the closest valid names."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for the closest choices, or '' when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = [c for c in choices if name.lower() in c.lower() or c.lower() in name.lower()]
        close = lowered[:n]
    return f" (did you mean: {', '.join(close)}?)" if close else ""
