"""The command line: the Typer app (``app``) and the console script's entry point (``main``)."""

from inrank_convert.cli.app import app, main

__all__ = ["app", "main"]
