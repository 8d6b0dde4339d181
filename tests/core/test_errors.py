"""core/errors.py: a user error is one line (what, where, how to fix it) whatever its parts hold, and
an option is named as the running CLI command spells it (a flag) or as Python does (a parameter)."""

from __future__ import annotations

import pytest

from inrank_convert.core.errors import (
    ArtifactError,
    CheckpointError,
    InrankError,
    ReportedElsewhere,
    UsageError,
    cli_flags,
    flag,
)


def test_the_message_joins_what_where_and_fix_on_one_line():
    error = CheckpointError("no weights", "/models/x", "pass a folder with model.safetensors")
    assert str(error) == error.message == "no weights: /models/x (pass a folder with model.safetensors)"
    assert (error.what, error.where, error.fix) == ("no weights", "/models/x", "pass a folder with model.safetensors")
    assert str(UsageError("bad value")) == "bad value"
    assert str(UsageError("bad value", fix="pass 1")) == "bad value (pass 1)"
    assert str(UsageError("bad value", "here")) == "bad value: here"


def test_a_multi_line_part_becomes_one_line():
    error = ArtifactError("corrupt manifest\n  expected a list,\tgot a dict", "/out/inrank.safetensors\n",
                          "re-run\ncompress")
    assert "\n" not in str(error) and "\t" not in str(error)
    assert str(error) == "corrupt manifest expected a list, got a dict: /out/inrank.safetensors (re-run compress)"


def test_every_user_error_is_an_inrank_error_with_an_exit_code():
    for kind in (UsageError, CheckpointError, ArtifactError):
        with pytest.raises(InrankError) as caught:
            raise kind("what")
        assert caught.value.exit_code == 2
    assert ReportedElsewhere(3).exit_code == 3 and ReportedElsewhere().exit_code == 1


def test_an_option_is_a_flag_only_where_the_running_command_has_it():
    assert flag("--max-rank") == "max_rank"  # called from Python: the parameter
    assert flag("--svd") == "engine" and flag("--no-embeddings") == "embeddings=False"
    with cli_flags({"--max-rank", "--svd"}):
        assert flag("--max-rank") == "--max-rank" and flag("--svd") == "--svd"
        assert flag("--stride") == "stride"  # not an option of this command
        with cli_flags(set()):  # a command reached through another: the inner one's flags
            assert flag("--max-rank") == "max_rank"
        assert flag("--max-rank") == "--max-rank"
    assert flag("--max-rank") == "max_rank"  # restored on the way out


def test_the_flags_are_restored_when_the_command_fails():
    with pytest.raises(UsageError), cli_flags({"--steps"}):
        assert flag("--steps") == "--steps"
        raise UsageError(f"{flag('--steps')} must be positive")
    assert flag("--steps") == "steps"
