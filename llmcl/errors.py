"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations

import difflib
from typing import Any, Iterable


class LlmclError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class RecipeError(LlmclError):
    """A recipe value is wrong: names the YAML key, the value and what was expected."""

    def __init__(self, key: str, value: Any = None, expected: str = "", *, message: str | None = None):
        self.key, self.value, self.expected = key, value, expected
        if message is None:
            message = f"recipe key '{key}': got {value!r}; expected {expected}"
        super().__init__(message)


def did_you_mean(name: str, options: Iterable[str], prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the nearest options, or a list of valid names when none is near.

    `prefix` (e.g. 'train.') is put before each suggestion so it reads as a full recipe key."""
    options = sorted(set(options))
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    if near:
        return " (did you mean " + " or ".join(f"'{prefix}{n}'" for n in near) + "?)"
    if not options or len(options) > 30:
        return ""
    return " (valid: " + ", ".join(prefix + o for o in options) + ")"
