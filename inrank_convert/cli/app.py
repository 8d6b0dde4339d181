"""The command line: the Typer app, its commands in the order ``--help`` lists them, and ``main``.

Each command parses its options, calls one library function and renders its result (``console``);
``boundary.user_errors`` turns a library error into one stderr line and an exit code.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
import typer.core

try:  # typer vendors click since 0.2x; before, it used click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

from inrank_convert.cli.compress import compress_command
from inrank_convert.cli.demo import demo_command
from inrank_convert.cli.export import (
    decompress_command,
    export_gguf_command,
    export_peft_command,
    generate_command,
)
from inrank_convert.cli.inspect import inspect_command, spectrum_command, verify_command
from inrank_convert.cli.measure import compare_runs_command, report_command, sweep_command
from inrank_convert.cli.train import resume_command, train_command
from inrank_convert.core.version import __version__

# click 8.2+: a bare command with no_args_is_help raises this usage error, which shows the help.
_NO_ARGS_IS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())


class OneLineUsageErrors(typer.core.TyperGroup):
    """A usage error (an unknown option or command, a missing argument, a value of the wrong type) is
    one line on stderr, like every other user error, naming where to read more; exit code 2 as
    Click's. Click's own four-line block (usage, hint, blank line, error) is the only exception to
    the one-line rule otherwise."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as err:  # bare ``inrank-convert``: the help, as before
            sys.stdout.write(err.ctx.get_help() + "\n")
            code = 0
        except click_errors.UsageError as err:
            # The program's own name, however it was started (python -m, a test runner's "root").
            where = " ".join(["inrank-convert", *(err.ctx.command_path.split()[1:] if err.ctx is not None else [])])
            message = " ".join(err.format_message().split()).rstrip(".")
            sys.stderr.write(f"error: {message} (see '{where} --help')\n")
            code = err.exit_code
        except click_errors.ClickException as err:
            sys.stderr.write(f"error: {' '.join(err.format_message().split())}\n")
            code = err.exit_code
        except typer.Abort:
            sys.stderr.write("error: interrupted; nothing was written\n")
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Compact low-rank artifacts from trained checkpoints: factorize W - W_init, keep what matters.")

COMMANDS = {
    "compress": compress_command,
    "inspect": inspect_command,
    "spectrum": spectrum_command,
    "decompress": decompress_command,
    "export-peft": export_peft_command,
    "export-gguf": export_gguf_command,
    "verify": verify_command,
    "report": report_command,
    "sweep": sweep_command,
    "compare-runs": compare_runs_command,
    "generate": generate_command,
    "train": train_command,
    "resume": resume_command,
    "demo": demo_command,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


def _version(value: bool):
    if value:
        typer.echo(f"inrank-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    pass


def main() -> None:
    app()
