"""One error family for the whole package.

The library raises these; the CLI turns them into a one-line message and the
exit code of DESIGN §2 (1 operation failed, 2 bad usage or input, 3 a gate
rejected a batch). Each subclass carries the data a caller needs to act on it.
"""
from __future__ import annotations


class LifelongError(Exception):
    """Base of every error lifelong raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class BadInput(LifelongError):
    """The user gave something unusable (a file, a flag, a policy); nothing changed."""

    exit_code = 2


class FactFileError(BadInput):
    """A fact file failed validation; `problems` holds every 'FILE:LINE: field: problem'."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = list(problems)
        head = f"{path}: {len(problems)} problem(s); nothing was stored"
        super().__init__(head + "\n" + "\n".join(problems))


class PolicyError(BadInput):
    """A policy file is invalid; the message names the file and the field."""


class StoreError(LifelongError):
    """The store cannot be opened, read or written as asked; it was left unchanged."""


class StoreExists(StoreError):
    """`init` refuses to overwrite a store."""


class StoreLocked(StoreError):
    """Another writer holds the store's lock."""


class FingerprintMismatch(StoreError):
    """Weights do not match what the store recorded: wrong model or a corrupted state."""


class EditFailed(LifelongError):
    """The edit could not be computed (NaN, singular system, ...); nothing was stored."""


class GateRejected(LifelongError):
    """A refresh gate rejected a batch; it was rolled back."""

    exit_code = 3

    def __init__(self, message: str, verdicts: dict | None = None):
        super().__init__(message)
        self.verdicts = verdicts or {}
