"""Errors a user can act on. Each carries what went wrong, where, and how to fix it.

The CLI prints ``str(error)`` as one line on stderr and exits non-zero; the library only raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# The flags of the CLI command now running (empty when the library is called from Python).
_CLI_FLAGS: ContextVar[frozenset[str]] = ContextVar("inrank_convert_cli_flags", default=frozenset())
# Flags whose Python parameter is not the flag's own name.
_PYTHON_NAMES = {"--svd": "engine", "--no-embeddings": "embeddings=False", "--embeddings": "embeddings"}


@contextmanager
def cli_flags(flags: Iterable[str]) -> Iterator[None]:
    """Run a CLI command: messages name the options it has as flags (``--max-rank``)."""
    token = _CLI_FLAGS.set(frozenset(flags))
    try:
        yield
    finally:
        _CLI_FLAGS.reset(token)


def flag(name: str) -> str:
    """How a message names an option: the flag (``--max-rank``) when the running CLI command has it,
    otherwise the Python parameter (``max_rank``), so that a library caller, or a command that
    reached this code through another (``resume`` compressing a dense checkpoint), is never told
    to pass a flag it does not have."""
    if name in _CLI_FLAGS.get():
        return name
    return _PYTHON_NAMES.get(name, name.removeprefix("--").replace("-", "_"))


class InrankError(Exception):
    """Base class: a user-facing problem with a clear message (never a bug)."""

    exit_code = 2

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = self.what
        if self.where:
            text = f"{text}: {self.where}"
        if self.fix:
            text = f"{text} ({self.fix})"
        # One line, always: a multi-line message would look like a traceback.
        return " ".join(text.split())


class UsageError(InrankError):
    """An option value or a combination of options that cannot work."""


class CheckpointError(InrankError):
    """A checkpoint is missing, unreadable, corrupt or of an unknown form."""


class MismatchError(InrankError):
    """Two checkpoints that must line up (trained vs init) do not."""


class InitReferenceError(InrankError):
    """The reference (init / base) cannot be found or no longer matches its recorded hash."""


class ArtifactError(InrankError):
    """An inrank-convert artifact is missing, corrupt, or of an unsupported version."""


class OutputError(InrankError):
    """The output location exists already or cannot be written."""


class NonFiniteError(InrankError):
    """A weight holds NaN or Inf."""


class StoppedError(InrankError):
    """A stop request (Ctrl-C, SIGTERM) ended a command of several stages in the middle of one: what
    it saved so far is named, and the stages after it did not run."""

    exit_code = 130


class DistributedError(InrankError):
    """A torchrun job cannot go on: a process stopped, or the processes disagree on their inputs."""


class ReportedElsewhere(InrankError):
    """Under torchrun: this process's job failed, and rank 0 prints the one line that says why
    (every process meets the same error, or handed its own to rank 0). The CLI prints nothing."""

    def __init__(self, exit_code: int = 1):
        super().__init__("reported by rank 0 of the torchrun job")
        self.exit_code = exit_code
