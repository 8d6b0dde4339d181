"""Options agree everywhere: one seed check for every command that takes a seed, float8 weights
refused in one line, a usage error (Click's) one line naming where to read more, an --include or
--exclude pattern that matches nothing refused, and a config.json that does not describe the
trained weights refused at compress time rather than in the first verify."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_pair
from tests.helpers.cli_contract import expect_error, run_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("options-agree"), "gpt2")


@pytest.mark.parametrize("seed", ["-5", str(2 ** 32), str(10 ** 20)])
@pytest.mark.parametrize("command", ["generate", "compress", "train"])
def test_one_seed_check_for_every_command(pair, tmp_path, seed, command):
    args = {"generate": ["generate", tmp_path / "not-read", "--prompt", "The"],
            "compress": ["compress", pair.trained_dir, "--init", pair.init_dir, "-o", tmp_path / "out"],
            "train": ["train", pair.trained_dir, "-o", tmp_path / "run", "--data", tmp_path / "not-read.txt",
                      "--steps", "2"]}[command]
    expect_error([*args, f"--seed={seed}"], says=("--seed must be between 0 and 4294967295", seed),
                 inputs=(pair.trained_dir,))


def test_float8_weights_are_refused_in_one_line(pair, tmp_path):
    trained = shutil.copytree(pair.trained_dir, tmp_path / "float8")
    state = load_file(trained / "model.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    state[name] = state[name].to(torch.float8_e4m3fn)
    save_file(state, trained / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    expect_error(["compress", trained, "--init", pair.init_dir, "-o", out],
                 says=(f"tensor '{name}' is float8_e4m3fn", "cannot factorize", "bfloat16"), output=out,
                 inputs=(trained, pair.init_dir))


@pytest.mark.parametrize("args, says", [
    (["compress", "--bogus"], ("no such option: --bogus", "see 'inrank-convert compress --help'")),
    (["no-such-command"], ("no such command 'no-such-command'", "see 'inrank-convert --help'")),
    (["compress"], ("missing argument", "see 'inrank-convert compress --help'")),
    (["generate", "x", "--prompt", "a", "--seed", "abc"], ("invalid value for '--seed'", "generate --help")),
], ids=["unknown-option", "unknown-command", "missing-argument", "not-a-number"])
def test_a_usage_error_is_one_line(args, says):
    line = expect_error(args, says=says)
    assert line.startswith("error: ") and run_cli(args).exit_code == 2


def test_help_and_a_bare_command_still_show_the_help():
    bare = run_cli([])
    assert bare.exit_code == 0 and "Commands:" in bare.stdout and bare.stderr == ""
    assert "compress [OPTIONS]" in run_cli(["compress", "--help"]).stdout


@pytest.mark.parametrize("option, pattern", [("--include", "nomatch*"), ("--include", "[transformer"),
                                             ("--exclude", "*.c_fc.weights")],
                         ids=["include-nothing", "include-malformed", "exclude-typo"])
def test_a_pattern_that_matches_nothing_is_refused(pair, tmp_path, option, pattern):
    out = tmp_path / "out"
    expect_error(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, option, pattern],
                 says=(f"{option} '{pattern}' matches no tensor",), output=out,
                 inputs=(pair.trained_dir, pair.init_dir))


@pytest.mark.parametrize("change, says", [
    (lambda text: text[:-20], ("cannot parse config.json",)),
    (lambda text: json.dumps({**json.loads(text), "n_embd": 32}), ("config.json",)),
    (lambda text: json.dumps({**json.loads(text), "n_layer": 3}), ("config.json does not describe the trained weights",
                                                                   "h.2")),
], ids=["not-json", "another-width", "another-depth"])
def test_a_config_that_does_not_describe_the_weights_is_refused_at_compress(pair, tmp_path, change, says):
    trained = shutil.copytree(pair.trained_dir, tmp_path / "trained")
    (trained / "config.json").write_text(change((trained / "config.json").read_text()))
    out = tmp_path / "out"
    expect_error(["compress", trained, "--init", pair.init_dir, "-o", out], says=(*says, str(trained)), output=out,
                 inputs=(trained, pair.init_dir))
