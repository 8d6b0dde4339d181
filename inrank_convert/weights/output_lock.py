"""One writer per output: an exclusive lock on the destination, held for the whole command.

Every command that writes takes the lock of its output (``-o``, a run folder) before any work, so
that a second writer of the same output, in any process, is refused at once with one line naming
the process that holds it, and the temporary folders beside an output belong to whoever holds its
lock (``outputs.atomic_output_dir`` removes a dead writer's only while holding it).

The lock is an advisory ``flock`` on a file beside the output (``.inrank-lock-NAME``, holding the
writer's pid): it dies with its process however that ends, so a killed writer never blocks the
next. POSIX only; elsewhere, and on file systems without locks, outputs are written unlocked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from inrank_convert.core.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

LOCK_PREFIX = ".inrank-lock-"
_held: set[Path] = set()  # the outputs this process holds the lock of (the outermost holder releases it)


def lock_path(output: Path) -> Path:
    """The lock file of an output: beside it (the output itself does not exist until the end)."""
    output = Path(os.path.abspath(output))
    return output.parent / f"{LOCK_PREFIX}{output.name}"


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``output`` (an advisory ``flock`` on its lock file) for the block:
    a second writer of the same output, in any process, is refused at once with one line naming
    the process that holds it. Re-entrant within a process (a command locks its output at the start
    and ``atomic_output_dir`` finds it held). The lock dies with its process, however it ends, so a
    killed writer never blocks the next one. Parent folders created for the lock are removed again
    if the output was not written."""
    output = Path(os.path.abspath(output))
    if output in _held:
        yield
        return
    created = _make_parents(output.parent)
    try:
        fd = _acquire(output)
    except BaseException:
        _remove_empty(created)
        raise
    _held.add(output)
    try:
        yield
    finally:
        _held.discard(output)
        _release(output, fd)
        if not os.path.lexists(output):
            _remove_empty(created)


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        for item in reversed(missing):
            item.mkdir()
    except OSError as err:
        _remove_empty(missing)
        raise OutputError(f"cannot create the output's folder ({err.strerror})", str(err.filename or folder),
                          "choose a writable -o location") from err
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def _acquire(output: Path) -> int:
    path = lock_path(output)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"cannot write beside the output ({err.strerror})", str(output.parent),
                              "choose a writable -o location") from err
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"the output is being written by process {holder}", str(output),
                              "wait for it to finish, or choose another -o") from None
        except OSError:  # a file system without locks (some network mounts): go on unlocked
            return fd
        # The holder before us may have removed the file after we opened it: then our lock is on
        # a file nobody else can see. Lock the file that is there now instead.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        opened = os.fstat(fd)
        if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


def _release(output: Path, fd: int) -> None:
    try:
        lock_path(output).unlink(missing_ok=True)  # while still held: nobody else holds this file
    except OSError:
        pass
    os.close(fd)
