"""The training ablation script: every row's command is one the CLI accepts, and a wrong row name is
one line and exit 2."""

from __future__ import annotations

import pytest

from benchmarks import train_ablation
from inrank_convert.cli.app import app


def test_every_rows_command_parses(tmp_path):
    from typer.main import get_command

    assert len(train_ablation.ROWS) >= 15
    click_command = get_command(app)
    for row in train_ablation.ROWS:
        args = train_ablation.command(row, tmp_path)[3:]  # after "python -m inrank_convert"
        # Parsed as the CLI parses them (an unknown option or a bad value raises); not run.
        context = click_command.commands[args[0]].make_context(args[0], args[1:])
        assert context.params["output"] == tmp_path / row.name, row.name


def test_list_and_an_unknown_row(tmp_path, capsys):
    assert train_ablation.main(["--list", "--out", str(tmp_path)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in listed] == [row.name for row in train_ablation.ROWS]
    assert train_ablation.main(["no-such-row", "--out", str(tmp_path)]) == 2
    assert "unknown row 'no-such-row'" in capsys.readouterr().err


@pytest.mark.parametrize("row", [r for r in train_ablation.ROWS if r.kind == "train" and "--mode" in r.args])
def test_inrank_rows_pass_the_options_check(row, tmp_path):
    from inrank_convert.training.options import TrainOptions, check_options

    values = {"data": "x", "steps": row.steps}
    args = list(row.args)
    while args:
        flag = args.pop(0).removeprefix("--").replace("-", "_")
        value = True if (not args or args[0].startswith("--")) else args.pop(0)
        assert flag in TrainOptions.__dataclass_fields__, flag
        values[flag] = value if value is True else _number(value)
    check_options(TrainOptions(**values))


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@pytest.mark.skipif(not (train_ablation.DATA / "tinyshakespeare" / "input.txt").is_file(),
                    reason="needs ../shared/data (Tiny Shakespeare)")
def test_a_failing_row_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "notes.txt").write_text("not a run")  # the row's run folder is taken
    assert train_ablation.main(["dense", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: row dense failed (exit 2)") and "Traceback" not in err[0]
    assert (tmp_path / "dense" / "notes.txt").read_text() == "not a run"
