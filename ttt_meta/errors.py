"""Mistakes a user can make and fix: the CLI prints ``error: <message>`` and exits with status 2, no traceback.

Every message says what is wrong, then how to fix it. ``TTT_META_DEBUG=1`` brings the traceback back. Any other
exception is a bug of ours and keeps its traceback.
"""


class UserError(ValueError):
    """A bad setting, episode size, checkpoint, image or folder."""


class MissingInput(UserError, FileNotFoundError):
    """A data root, checkpoint, image or folder that is not there."""


class TrainingDiverged(UserError, FloatingPointError):
    """A non-finite training loss: the run stopped before it reached the weights."""
