"""DenseDet's user-error hierarchy: one exception class per kind of bad input, each with a CLI exit code.

Everything the user can fix (a config key or value, an annotation file, an image, a checkpoint, a run whose loss
or gradients stopped being finite) raises a subclass of :class:`DenseDetError`. ``densedet`` (``cli.main``) prints
such an error as one line ``densedet: <kind> error: <message>`` on stderr and exits with the class's
``exit_code``; the traceback is shown only with ``--debug`` or ``DENSEDET_DEBUG=1``. Any other exception is a bug
and keeps its traceback (exit code 1). The table is documented in ``docs/cli.md``.

The classes also derive from the builtin each replaced (``ValueError``, ``RuntimeError``, ``FloatingPointError``)
so code that caught those keeps working. No torch import here: every module can import this one.
"""

from __future__ import annotations

import errno

__all__ = [
    "EXIT_CODES",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DataError",
    "DataWarning",
    "DenseDetError",
    "NonFiniteError",
    "NotImplementedConfigError",
    "PathError",
    "os_error_reason",
]


class DenseDetError(Exception):
    """Base class of the errors a user can fix; ``exit_code`` is what ``densedet`` exits with."""

    exit_code = 1
    kind = "densedet"


class ConfigError(DenseDetError, ValueError):
    """An invalid config: the message names the file and the key path and shows the value as typed.

    ``path`` is the dotted key path (``model.bbox_head.loss_cls.gama``) when known, so the config loader can
    prefix the message with the file that set that key.
    """

    exit_code = 2  # the same code argparse uses for a bad command line
    kind = "config"

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class DataError(DenseDetError, ValueError):
    """Bad dataset or image input (annotation file, annotation, image, image folder, empty training set); the
    message names the file and the item."""

    exit_code = 3
    kind = "data"


class DataWarning(UserWarning):
    """Data that was skipped or fixed (annotations skipped while loading, one warning per kind, with counts), or a
    data setting that works but is likely a mistake."""


class CheckpointError(DenseDetError, RuntimeError):
    """A checkpoint (or pretrained weights file) that is missing, unreadable, unsafe, does not fit the model, or
    that would hold non-finite tensors; the message names the file."""

    exit_code = 4
    kind = "checkpoint"


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError`` for callers that expect one)."""


class NotImplementedConfigError(ConfigError, NotImplementedError):
    """The config asks for something DenseDet does not implement (yet), e.g. test-time augmentation of a two-stage
    detector: a config error (exit 2) that is also a ``NotImplementedError``."""


class PathError(DenseDetError, OSError):
    """A folder or file DenseDet must write (a work dir, ``--out``, ``$DENSEDET_HOME``) that it cannot: not
    writable, read-only, not a folder, a full disk. The message names the path and what to do (exit 2, as a bad
    path on the command line). Also an ``OSError``, so callers that caught the original keep working; construct it
    with one message string."""

    exit_code = 2
    kind = "path"


#: errno -> what it means for a user, and what to do
_ERRNO_TEXT = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device (free some, or write elsewhere)",
    errno.EDQUOT: "disk quota exceeded (free some space, or write elsewhere)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists and is not a folder",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error (a failing disk or network share?)",
    errno.ENAMETOOLONG: "file name too long",
}


def os_error_reason(err: BaseException) -> str:
    """A short, plain reason for an ``OSError`` ("permission denied", "read-only file system", "no space left on
    the device (...)"), without the path; ``str(err)`` for anything else."""
    code = getattr(err, "errno", None)
    if code in _ERRNO_TEXT:
        return _ERRNO_TEXT[code]
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


class NonFiniteError(DenseDetError, FloatingPointError):
    """Training produced a non-finite loss, or too many consecutive non-finite gradients; the message names the
    epoch and iteration."""

    exit_code = 5
    kind = "training"


# exit code -> meaning, as documented in docs/cli.md (0 success, 1 internal error, 130 interrupted).
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error (a bug: the traceback is printed)",
    ConfigError.exit_code: "usage, config or path error (a folder that cannot be written, ...)",
    DataError.exit_code: "data error",
    CheckpointError.exit_code: "checkpoint error",
    NonFiniteError.exit_code: "training stopped: non-finite loss or gradients",
    130: "interrupted (Ctrl-C)",
}
