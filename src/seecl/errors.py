"""Errors seecl raises on purpose: the CLI prints their message (no traceback) and exits non-zero.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class SeeclError(Exception):
    """A problem the user can fix: bad input, bad config, missing files."""


class ConfigError(SeeclError):
    """A config value is invalid or an override does not name a field."""


class DataError(SeeclError):
    """A data file is malformed; the message names the file and, when known, the line."""

    def __init__(self, message: str, path: object = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class StoreError(SeeclError):
    """An ensemble directory is missing, incompatible, or an expert name is invalid."""


class ModelError(SeeclError):
    """A base model cannot be found or loaded without downloading it."""
