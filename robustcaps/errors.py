"""Errors a user can act on.

Library code raises :class:`RobustcapsError` (or a subclass) for bad input: unknown
model, malformed file, invalid epsilon list. The CLI turns it into a one-line message on
stderr and exit code 2; Python callers get an ordinary ``ValueError`` subclass.
"""

from __future__ import annotations


class RobustcapsError(ValueError):
    """Bad input from the user: the message alone must say what to fix."""


class DataError(RobustcapsError):
    """A dataset file is missing, truncated, corrupt or of the wrong format."""


class ModelLoadError(RobustcapsError):
    """A model spec cannot be resolved, imported or loaded."""
