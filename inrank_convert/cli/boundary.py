"""The error boundary of every command: an InrankError (a user's mistake or a broken input) becomes
one line on stderr and a non-zero exit code; only bugs show a traceback. Under torchrun, rank 0
prints the job's one line.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import shutil
import signal
import threading
import typing
from pathlib import Path

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as Ctrl-C does: every temporary
    output is removed on the way out (``atomic_output_dir``), a new run folder without a checkpoint
    too, and the command exits 143 with one line. (The training loop and torchrun jobs install
    handlers of their own while they run: a checkpoint first, or the job's own report.)"""


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# OS errors on write, as user errors: the exit code of an I/O failure (not 1, which verify uses).
IO_EXIT_CODE = 74  # EX_IOERR (sysexits.h)


def os_error_line(err: OSError) -> str:
    """One line for an OS error: what, the path, and what to do (ENOSPC: how much room is left)."""
    path = err.filename or ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_space(path)
        room = f"; {free} free there" if free else ""
        return f"no space left on the device: {path} (free some space{room}, or choose another -o); nothing was kept"
    return f"{err.strerror or err}: {path} (check the path, free space and permissions)"


def _free_space(path: str) -> str:
    folder = Path(path or ".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return ""
    return f"{usage.free / 1e6:.1f} MB"


def user_errors(command):
    """Turn library errors into one stderr line and an exit code. Inside the command, library
    messages name the options this command has as its flags (``errors.flag``)."""
    flags = declared_flags(command)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with cli_flags(flags), _sigterm_unwinds():
                return command(*args, **kwargs)
        except InrankError as err:
            if not isinstance(err, ReportedElsewhere):  # under torchrun, rank 0 prints the job's one line
                console.error(err.message)
            raise typer.Exit(err.exit_code) from None
        except Terminated:
            console.error("terminated (SIGTERM); nothing was written")
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            console.error("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except OSError as err:
            console.error(os_error_line(err))
            raise typer.Exit(IO_EXIT_CODE) from None

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
