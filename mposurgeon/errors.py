"""Errors that the CLI turns into one-line messages and exit codes.

Every error a user can cause derives from `MposurgeonError`; its `exit_code` follows DESIGN.md:
1 error, 2 usage error, 3 verification/tolerance failure, 4 model not found.
"""

from __future__ import annotations


class MposurgeonError(Exception):
    """A user-facing error: `str(err)` is one line; `hint` says what to do about it."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(MposurgeonError):
    """Options that contradict each other or name things that do not exist (exit 2)."""

    exit_code = 2


class ShapeError(UsageError):
    """A matrix shape that the requested MPO modes cannot factorize."""


class VerificationError(MposurgeonError):
    """A numeric check failed: outputs differ or a tolerance was exceeded (exit 3)."""

    exit_code = 3


class ModelNotFoundError(MposurgeonError):
    """A path, hub id or cache entry that does not exist (exit 4)."""

    exit_code = 4


class ArtifactError(MposurgeonError):
    """An artifact or checkpoint that is corrupted, tampered with or of an unknown format."""


class OutputExistsError(MposurgeonError):
    """An output directory that exists and is not empty, or that is the input."""


class DataError(MposurgeonError):
    """A training or scoring data file that cannot be read: the message names file and line."""


class OutputError(MposurgeonError):
    """An output that cannot be written: no space left, a file size limit, a read-only or
    unwritable file system. The message names the file, `path`."""

    def __init__(self, message: str, hint: str | None = None, path: object = None) -> None:
        super().__init__(message, hint)
        self.path = path


def one_line(err: BaseException, limit: int = 300) -> str:
    """The message of `err` on one line, at most `limit` characters (libraries such as
    transformers write messages of several lines)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
