"""The error boundary of every command: an InrankError (a user's mistake or a broken input) becomes
one line on stderr and a non-zero exit code; only bugs show a traceback. Under torchrun, rank 0
prints the job's one line.
"""

from __future__ import annotations

import functools
import typing

import typer

from inrank_convert.cli import console
from inrank_convert.core.errors import InrankError, ReportedElsewhere, cli_flags


def declared_flags(command) -> set[str]:
    """Every long flag a command declares (``--embeddings/--no-embeddings`` gives both)."""
    flags = set()
    for hint in typing.get_type_hints(command, include_extras=True).values():
        for info in getattr(hint, "__metadata__", ()):
            if not isinstance(info, typer.models.OptionInfo):
                continue
            # In Annotated[..., typer.Option("--x", "-x")] typer takes the first name as ``default``.
            declarations = [info.default, *(info.param_decls or ())]
            for declaration in declarations:
                if isinstance(declaration, str):
                    flags.update(part for part in declaration.split("/") if part.startswith("--"))
    return flags


def user_errors(command):
    """Turn library errors into one stderr line and an exit code. Inside the command, library
    messages name the options this command has as its flags (``errors.flag``)."""
    flags = declared_flags(command)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with cli_flags(flags):
                return command(*args, **kwargs)
        except InrankError as err:
            if not isinstance(err, ReportedElsewhere):  # under torchrun, rank 0 prints the job's one line
                console.error(err.message)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            console.error("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except OSError as err:
            console.error(f"{err.strerror or err}: {err.filename or ''} (check the path, free space and permissions)")
            raise typer.Exit(1) from None

    return wrapper


def rank0_reports(command):
    """Under torchrun, a user error met on a rank other than 0 before compress starts (a bad flag:
    every process meets it) is handed to rank 0, which prints the job's one line."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from inrank_convert.core.distributed import env_world

        try:
            return command(*args, **kwargs)
        except ReportedElsewhere:
            raise
        except KeyboardInterrupt:
            world = env_world()
            if not world.enabled or world.is_main:
                raise
            raise ReportedElsewhere(130) from None  # Ctrl-C reaches every process: rank 0 says it once
        except (InrankError, OSError) as err:
            world = env_world()
            if not world.enabled or world.is_main:
                raise
            from inrank_convert.compression.torchrun import hand_error_to_main

            hand_error_to_main(err)

    return wrapper
