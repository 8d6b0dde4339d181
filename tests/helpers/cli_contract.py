"""The CLI through typer's CliRunner, as the tests run it: the user-error contract every bad-input
test checks (a non-zero exit, exactly one line on stderr, no traceback, nothing written, every input
untouched: ``expect_error``), and success (``expect_ok``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inrank_convert.cli import app
from tests.conftest import REPO, snapshot

TMP_PREFIX = ".inrank-tmp-"


def _state(path: Path):
    """What a path looks like on disk, to prove it was not touched (or not created)."""
    path = Path(path)
    if path.is_dir():
        return ("folder", snapshot(path), sorted(str(p.relative_to(path)) for p in path.rglob("*")))
    if path.is_file():
        stat = path.stat()
        return ("file", stat.st_size, stat.st_mtime_ns)
    return None


def temps_beside(path: Path) -> list[Path]:
    parent = Path(path).parent
    return sorted(parent.glob(f"{TMP_PREFIX}*")) if parent.is_dir() else []


def run_cli(args: list) -> object:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def _describe(args: list, result) -> str:
    return (f"inrank-convert {' '.join(str(a) for a in args)}\nexit code: {result.exit_code}\n"
            f"stderr: {result.stderr!r}\nstdout: {result.stdout[-2000:]!r}")


def expect_ok(args: list):
    """Run the CLI and require success (for the fixtures)."""
    result = run_cli(args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail("uncaught exception:\n" + "".join(traceback.format_exception(*result.exc_info))
                    + _describe(args, result))
    assert result.exit_code == 0, _describe(args, result)
    return result


def run_json(args: list) -> dict:
    """Run the CLI, require success (``expect_ok``), and parse its stdout as JSON."""
    return json.loads(expect_ok(args).stdout)


def expect_error(args: list, says: tuple = (), *, output: Path | None = None, inputs: tuple = ()) -> str:
    """Run the CLI on a bad input and assert the whole user-error contract; return the error line.

    ``says``: words the line must hold (case-insensitive); a tuple item means "any of these".
    ``output``: the path the command would write: afterwards it must not exist (or, if it existed,
    be unchanged), with no ``.inrank-tmp-*`` folder left beside it.
    ``inputs``: files or folders that must be untouched (size and mtime of every file, and no
    file or folder added or removed).
    """
    watched = [Path(p) for p in inputs] + ([Path(output)] if output is not None else [])
    before = {path: _state(path) for path in watched}
    temps_before = temps_beside(output) if output is not None else []
    result = run_cli(args)
    where = _describe(args, result)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail("uncaught exception (a traceback, not a user error):\n"
                    + "".join(traceback.format_exception(*result.exc_info)) + where)
    assert result.exit_code != 0, "a bad input was accepted\n" + where
    assert "Traceback" not in result.stderr + result.stdout, where
    line = result.stderr.removesuffix("\n")
    assert line.strip(), "no error message on stderr\n" + where
    assert "\n" not in line, "stderr is not exactly one line\n" + where
    lowered = line.lower()
    for word in says:
        options = (word,) if isinstance(word, str) else tuple(word)
        assert any(str(option).lower() in lowered for option in options), f"message lacks {options}\n{where}"
    for path in watched:
        if path == output and before[path] is None:
            assert not os.path.lexists(path), f"output {path} was written\n{where}"
        else:
            assert _state(path) == before[path], f"{path} was changed\n{where}"
    if output is not None:
        assert temps_beside(output) == temps_before, f"temporary folder left beside {output}\n{where}"
    return line


# --------------------------------------------------------------------------- arguments as one tuple


def invoke(*args) -> object:
    """Run the CLI (arguments as one tuple); an uncaught exception fails the test with its traceback."""
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail("uncaught exception:\n" + "".join(traceback.format_exception(*result.exc_info)))
    return result


def ok(*args) -> object:
    result = invoke(*args)
    assert result.exit_code == 0, (args, result.stdout, result.stderr)
    return result


def expect_error_line(*args, says: tuple = ()) -> str:
    """Non-zero exit, exactly one ``error: `` line on stderr, no traceback; the line holds every word of
    ``says``. (``expect_error`` checks more: nothing written, inputs untouched.)"""
    result = invoke(*args)
    where = f"{args}\nexit {result.exit_code}\nstderr: {result.stderr!r}\nstdout: {result.stdout[-500:]!r}"
    assert result.exit_code != 0, "a bad input was accepted\n" + where
    assert "Traceback" not in result.stderr + result.stdout, where
    line = result.stderr.removesuffix("\n")
    assert line.startswith("error: ") and "\n" not in line, "stderr is not exactly one error line\n" + where
    for word in says:
        assert word.lower() in line.lower(), f"message lacks {word!r}\n{where}"
    return line


# --------------------------------------------------------------------------- a signal mid-command


def signalled_cli(args: list, ready: Callable[[], bool], sig: int, settle: float, timeout: float = 60
                  ) -> tuple[int, str]:
    """Run the CLI in a fresh process, send it ``sig`` once ``ready()`` holds (and ``settle`` seconds
    more), and return (exit code, stderr). The process is killed whatever happens."""
    command = [sys.executable, "-m", "inrank_convert", *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready(), f"the command never got to the point of the signal (exit {process.poll()})"
        time.sleep(settle)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr
