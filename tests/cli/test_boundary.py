"""cli/boundary.py: the error boundary of every command: a user error is one ``error:`` line on
stderr and its exit code, library messages name the command's own flags, Ctrl-C and OS errors are
one line too, and a bug still raises; every long flag a command declares is found."""

from __future__ import annotations

import errno
import re
from typing import Annotated

import pytest
import typer

from inrank_convert.cli.boundary import IO_EXIT_CODE, Terminated, declared_flags, user_errors
from inrank_convert.core.errors import CheckpointError, UsageError, flag


def command(
    steps: Annotated[int, typer.Option("--steps", "-s", help="steps")] = 1,
    embeddings: Annotated[bool, typer.Option("--embeddings/--no-embeddings")] = True,
    max_rank: Annotated[int | None, typer.Option(help="a flag typer names itself")] = None,
    name: str = "x",
) -> None:
    raise UsageError(f"{flag('--steps')} must be positive", fix=f"pass {flag('--steps')} 1 or more")


def test_every_long_flag_a_command_declares():
    assert declared_flags(command) == {"--steps", "--embeddings", "--no-embeddings"}
    from inrank_convert.cli.compress import compress_command

    flags = declared_flags(compress_command)
    assert {"--threshold", "--rank", "--init", "--embeddings", "--no-embeddings", "--target-ratio"} <= flags
    assert all(flag.startswith("--") for flag in flags)


def test_a_user_error_is_one_line_naming_the_commands_flags(capsys):
    with pytest.raises(typer.Exit) as caught:
        user_errors(command)()
    assert caught.value.exit_code == 2
    assert capsys.readouterr().err == "error: --steps must be positive (pass --steps 1 or more)\n"
    with pytest.raises(UsageError, match="^steps must be positive"):  # the library alone names the parameter
        command()


@pytest.mark.parametrize("raised, code, line", [
    (CheckpointError("no weights", "/m"), 2, "error: no weights: /m\n"),
    (KeyboardInterrupt(), 130, "error: interrupted; nothing was written\n"),
    (Terminated(), 143, "error: terminated (SIGTERM); nothing was written\n"),
    (PermissionError(13, "Permission denied", "/out/x"), IO_EXIT_CODE,
     "error: Permission denied: /out/x (check the path, free space and permissions)\n"),
    (OSError(errno.ENOSPC, "No space left on device", "/nonexistent-folder/x"), IO_EXIT_CODE,
     re.compile(r"error: no space left on the device: /nonexistent-folder/x \(free some space; [0-9.]+ MB free "
                r"there, or choose another -o\); nothing was kept\n")),
])
def test_interrupts_and_os_errors_are_one_line_too(capsys, raised, code, line):
    def failing() -> None:
        raise raised

    with pytest.raises(typer.Exit) as caught:
        user_errors(failing)()
    assert IO_EXIT_CODE not in (0, 1, 2)  # 1 is verify's failure, 2 a user error
    err = capsys.readouterr().err
    assert caught.value.exit_code == code
    assert line.fullmatch(err) if isinstance(line, re.Pattern) else err == line, err


def test_a_bug_is_not_hidden(capsys):
    def buggy() -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        user_errors(buggy)()
    assert capsys.readouterr().err == ""
