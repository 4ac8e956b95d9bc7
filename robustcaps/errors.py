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


class ModelRuntimeError(RobustcapsError):
    """A user's model raised while it was running (an attack, a diagnosis, a probe).

    ``detail`` is ``"<ExceptionType>: <message>"`` of the model's own exception, which
    stays available as ``__cause__`` (the CLI logs its traceback with ``-vv``).
    """

    def __init__(self, model: str, detail: str) -> None:
        super().__init__(f"model {model!r} raised {detail}")
        self.model, self.detail = model, detail


class NonFiniteError(RobustcapsError):
    """A model produced NaN/Inf scores or input gradients during an evaluation.

    Such a sample has no meaningful prediction (argmax of NaN is 0) or attack step, so
    the run stops instead of counting it.
    """


class Interrupted(Exception):  # noqa: N818 - named after what happened, like KeyboardInterrupt
    """Ctrl-C (or SIGTERM) stopped a command; the message says how to continue.

    Not a :class:`RobustcapsError`: the CLI exits with 130, the shell convention for SIGINT.
    """
