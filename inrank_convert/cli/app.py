"""The command line: the Typer app, its commands in the order ``--help`` lists them, and ``main``.

Each command parses its options, calls one library function and renders its result (``console``);
``boundary.user_errors`` turns a library error into one stderr line and an exit code.
"""

from __future__ import annotations

from typing import Annotated

import typer

from inrank_convert.cli.compress import compress_command
from inrank_convert.cli.demo import demo_command
from inrank_convert.cli.export import decompress_command, export_peft_command, generate_command
from inrank_convert.cli.inspect import inspect_command, spectrum_command, verify_command
from inrank_convert.cli.measure import compare_runs_command, report_command, sweep_command
from inrank_convert.cli.train import resume_command, train_command
from inrank_convert.core.version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Compact low-rank artifacts from trained checkpoints: factorize W - W_init, keep what matters.")

COMMANDS = {
    "compress": compress_command,
    "inspect": inspect_command,
    "spectrum": spectrum_command,
    "decompress": decompress_command,
    "export-peft": export_peft_command,
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
