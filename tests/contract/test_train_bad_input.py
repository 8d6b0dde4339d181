"""Bad inputs to ``train`` and ``resume`` through the real CLI: each one exits non-zero with exactly
one clear line on stderr and no traceback, writes nothing (no run folder, no leftover
``.inrank-tmp-*``) and leaves every input as it was (a run folder resumed in place included).

The same contract as test_bad_input.py. One tiny GPT-2 run (2 steps on a slice of Tiny
Shakespeare) and one artifact compressed from it are made once per module; a test that resumes
a run, or changes one, works on its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers.cli_contract import expect_error, expect_ok
from tests.helpers.training import SMALL, TEXT, TOKENIZER, tiny_config

pytestmark = pytest.mark.skipif(not (TOKENIZER / "vocab.json").is_file() or not (TOKENIZER / "merges.txt").is_file()
                                or not TEXT.is_file(),
                                reason="needs ../shared/data (gpt2-tokenizer and tinyshakespeare/input.txt)")


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    root: Path  # everything below is an input: no test may change it
    config: Path  # config.json of the tiny GPT-2
    data: Path  # a slice of Tiny Shakespeare (about 700 tokens)
    run: Path  # a dense run trained from config for 2 steps: step-0, step-2, metrics.jsonl
    artifact: Path  # compress RUN: a seed reference (not zero)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("train-bad-input")
    config = tiny_config(root / "config")
    data = root / "text.txt"
    data.write_text(TEXT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    run = root / "run"
    expect_ok(["train", config, "-o", run, "--data", data, "--steps", "2", *SMALL, "--quiet"])
    assert (run / "step-2" / "train_state").is_dir()
    artifact = root / "artifact"
    expect_ok(["compress", run, "-o", artifact, "--no-embeddings", "--quiet"])
    manifest = json.loads(expect_ok(["inspect", artifact, "--json"]).stdout)
    assert manifest["reference"] == "seed"
    return Inputs(root, config, data, run, artifact)


def run_copy(inputs: Inputs, tmp_path: Path, name: str = "run") -> Path:
    """A private copy of the trained run (mtimes kept), for tests that resume or change it."""
    return Path(shutil.copytree(inputs.run, tmp_path / name))


def train_args(inputs: Inputs, out: Path, *extra, data: Path | None = None, steps: str = "2") -> list:
    return ["train", inputs.config, "-o", out, "--data", data or inputs.data, "--steps", steps, *SMALL, *extra]


def resume_artifact_args(inputs: Inputs, out: Path, *extra, data: Path | None = None) -> list:
    return ["resume", inputs.artifact, "-o", out, "--data", data or inputs.data, "--steps", "2",
            "--batch-size", "4", "--block-size", "16", *extra]


def gpt2_tokenizer_with_other_merges(folder: Path) -> Path:
    """The GPT-2 vocabulary with the last 1000 merges dropped: same size, other tokens."""
    folder.mkdir()
    shutil.copyfile(TOKENIZER / "vocab.json", folder / "vocab.json")
    lines = (TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()
    (folder / "merges.txt").write_text("\n".join(lines[:-1000]) + "\n", encoding="utf-8")
    return folder


def word_level_tokenizer(folder: Path) -> Path:
    """A tiny WordLevel tokenizer.json (a few words): a tokenizer of another kind altogether."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "the", "king", "and", "to", "of", "I", "you", "my", ",", ".", ":"]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# --------------------------------------------------------------------------- 1. --steps


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_steps_not_positive(inputs, tmp_path, steps):
    out = tmp_path / "out"
    expect_error(train_args(inputs, out, steps=steps), says=("--steps",), output=out, inputs=(inputs.root,))


@pytest.mark.parametrize("steps", [None, "0", "1", "2"])
def test_resume_run_steps_not_beyond_its_step(inputs, tmp_path, steps):
    """The run is at step 2: --steps (the run's total, default the recorded 2) must be larger."""
    run = run_copy(inputs, tmp_path)
    extra = [] if steps is None else ["--steps", steps]
    says = ("--steps",) if steps == "0" else ("--steps", "2")  # 0: not a positive number at all
    expect_error(["resume", run, *extra], says=says, inputs=(run, inputs.root))


def test_resume_run_steps_not_beyond_its_step_into_new_run(inputs, tmp_path):
    run = run_copy(inputs, tmp_path)
    out = tmp_path / "out"
    expect_error(["resume", run, "-o", out, "--steps", "2"], says=("--steps", "2"), output=out,
                 inputs=(run, inputs.root))


# --------------------------------------------------------------------------- 2. the training text


def _bad_data(tmp_path: Path, kind: str) -> tuple[Path, tuple]:
    """(data path, words the message must hold)."""
    file = tmp_path / f"{kind}.txt"
    if kind == "short":  # a few tokens, fewer than one block of 16 + 1
        file.write_text("To be, or not to be.\n", encoding="utf-8")
        return file, (str(file), "block", ("--block-size", "more text"))
    if kind == "empty":
        file.write_bytes(b"")
        return file, (str(file), "empty")
    if kind == "missing":
        return file, (str(file), ("no such", "not found", "does not exist"))
    if kind == "binary":
        file.write_bytes(bytes(range(256)) * 64)
        return file, (str(file), "binary")
    raise ValueError(kind)


DATA_KINDS = ["short", "empty", "missing", "binary"]


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_train_bad_data(inputs, tmp_path, kind):
    data, says = _bad_data(tmp_path, kind)
    out = tmp_path / "out"
    expect_error(train_args(inputs, out, data=data), says=says, output=out, inputs=(inputs.root, data))


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_resume_artifact_bad_data(inputs, tmp_path, kind):
    data, says = _bad_data(tmp_path, kind)
    out = tmp_path / "out"
    expect_error(resume_artifact_args(inputs, out, data=data), says=says, output=out, inputs=(inputs.root, data))


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_resume_run_bad_data(inputs, tmp_path, kind):
    """A run resumed in place with bad --data: the run folder (cache and metrics included) stays as it was."""
    data, says = _bad_data(tmp_path, kind)
    run = run_copy(inputs, tmp_path)
    expect_error(["resume", run, "--data", data, "--steps", "4"], says=says, inputs=(run, data, inputs.root))


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_resume_run_into_a_new_run_bad_data(inputs, tmp_path, kind):
    """A run continued into a new -o with bad --data: the new run folder is not made."""
    data, says = _bad_data(tmp_path, kind)
    run = run_copy(inputs, tmp_path)
    out = tmp_path / "out"
    expect_error(["resume", run, "-o", out, "--data", data, "--steps", "4"], says=says, output=out,
                 inputs=(run, data, inputs.root))


def test_resume_dense_checkpoint_missing_data(inputs, tmp_path):
    """A dense checkpoint (compressed first, then resumed) with a missing --data: no run folder and no
    temporary folder left beside it."""
    data, says = _bad_data(tmp_path, "missing")
    out = tmp_path / "out"
    before = sorted(tmp_path.iterdir())
    expect_error(["resume", inputs.run / "step-2", "-o", out, "--init", inputs.run / "step-0", "--data", data,
                  "--steps", "4", "--batch-size", "4", "--block-size", "16"], says=says, output=out,
                 inputs=(inputs.root,))
    assert sorted(tmp_path.iterdir()) == before


def test_train_bad_val_data(inputs, tmp_path):
    data, says = _bad_data(tmp_path, "binary")
    out = tmp_path / "out"
    expect_error(train_args(inputs, out, "--val-data", data), says=says, output=out, inputs=(inputs.root, data))


# --------------------------------------------------------------------------- 3. where the run goes


@pytest.mark.parametrize("command", ["train", "resume-artifact", "resume-run"])
def test_output_under_a_regular_file(inputs, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    out = blocker / "out"
    run = run_copy(inputs, tmp_path) if command == "resume-run" else None
    args = {"train": lambda: train_args(inputs, out),
            "resume-artifact": lambda: resume_artifact_args(inputs, out),
            "resume-run": lambda: ["resume", run, "-o", out, "--steps", "4"]}[command]()
    expect_error(args, says=(str(blocker),), output=out, inputs=(inputs.root, blocker) + ((run,) if run else ()))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions: a read-only folder is writable")
@pytest.mark.parametrize("command", ["train", "resume-artifact"])
def test_output_under_a_read_only_folder(inputs, tmp_path, command):
    locked = tmp_path / "read-only"
    locked.mkdir()
    out = locked / "out"
    args = train_args(inputs, out) if command == "train" else resume_artifact_args(inputs, out)
    locked.chmod(0o555)
    try:
        expect_error(args, says=(str(locked), "writable"), output=out, inputs=(inputs.root, locked))
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("command", ["train", "resume-artifact", "resume-run"])
def test_output_is_a_regular_file(inputs, tmp_path, command):
    out = tmp_path / "a-file"
    out.write_text("not a run folder\n")
    run = run_copy(inputs, tmp_path) if command == "resume-run" else None
    args = {"train": lambda: train_args(inputs, out),
            "resume-artifact": lambda: resume_artifact_args(inputs, out),
            "resume-run": lambda: ["resume", run, "-o", out, "--steps", "4"]}[command]()
    line = expect_error(args, says=(str(out), ("not a folder", "not a directory", "is a file")), output=out,
                        inputs=(inputs.root,) + ((run,) if run else ()))
    assert "resume" not in line, f"a regular file is no run to continue: {line}"


def test_train_into_an_existing_run(inputs, tmp_path):
    run = run_copy(inputs, tmp_path)
    expect_error(train_args(inputs, run), says=(str(run), "resume"), output=run, inputs=(inputs.root,))


def test_resume_artifact_into_an_existing_run(inputs, tmp_path):
    run = run_copy(inputs, tmp_path)
    expect_error(resume_artifact_args(inputs, run), says=(str(run),), output=run, inputs=(inputs.root,))


def test_resume_run_into_another_existing_run(inputs, tmp_path):
    run = run_copy(inputs, tmp_path)
    other = run_copy(inputs, tmp_path, "other")
    expect_error(["resume", run, "-o", other, "--steps", "4"], says=(str(other),), output=other,
                 inputs=(run, inputs.root))


# --------------------------------------------------------------------------- 4. --efficient needs a zero reference


def test_efficient_on_an_artifact_with_a_seed_reference(inputs, tmp_path):
    out = tmp_path / "out"
    expect_error(resume_artifact_args(inputs, out, "--efficient"),
                 says=("--efficient", "reference", "seed", "--no-init"), output=out, inputs=(inputs.root,))


def test_efficient_on_a_dense_run(inputs, tmp_path):
    """A run continues as it was trained: --efficient cannot be switched on when resuming it."""
    run = run_copy(inputs, tmp_path)
    line = expect_error(["resume", run, "--steps", "4", "--efficient"], says=("--efficient", "dense"),
                        inputs=(run, inputs.root))
    assert "--mode" not in line, f"resume has no --mode option to pass: {line}"


# --------------------------------------------------------------------------- 5. no complete checkpoint


def _incomplete_run(inputs: Inputs, tmp_path: Path, how: str) -> Path:
    run = run_copy(inputs, tmp_path)
    if how == "only-step-0":
        shutil.rmtree(run / "step-2")
    elif how == "no-train-state":
        shutil.rmtree(run / "step-2" / "train_state")
    elif how == "no-state-tensors":
        (run / "step-2" / "train_state" / "state.safetensors").unlink()
    else:
        raise ValueError(how)
    return run


@pytest.mark.parametrize("how", ["only-step-0", "no-train-state", "no-state-tensors"])
def test_resume_run_without_a_complete_checkpoint(inputs, tmp_path, how):
    run = _incomplete_run(inputs, tmp_path, how)
    expect_error(["resume", run, "--steps", "4"], says=(str(run), "checkpoint"), inputs=(run, inputs.root))
    out = tmp_path / "out"
    expect_error(["resume", run, "-o", out, "--steps", "4"], says=(str(run), "checkpoint"), output=out,
                 inputs=(run, inputs.root))


def test_resume_run_with_a_damaged_trainer_state(inputs, tmp_path):
    run = run_copy(inputs, tmp_path)
    state = run / "step-2" / "train_state" / "trainer_state.json"
    state.write_text(state.read_text()[:100])
    expect_error(["resume", run, "--steps", "4"], says=("train_state",), inputs=(run, inputs.root))


def test_resume_run_with_a_truncated_state_file(inputs, tmp_path):
    run = run_copy(inputs, tmp_path)
    tensors = run / "step-2" / "train_state" / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    expect_error(["resume", run, "--steps", "4"], says=("cannot read the training state", "step-2", "move step-2 out"),
                 inputs=(run, inputs.root))


@pytest.mark.parametrize("state", [[1, 2], {"step": "2", "mode": "dense", "options": {}},
                                   {"step": 2, "mode": "dense", "options": []},
                                   {"step": 2, "mode": "sideways", "options": {}}],
                         ids=["a-list", "step-a-string", "options-a-list", "unknown-mode"])
def test_resume_run_with_a_trainer_state_of_the_wrong_shape(inputs, tmp_path, state):
    run = run_copy(inputs, tmp_path)
    (run / "step-2" / "train_state" / "trainer_state.json").write_text(json.dumps(state))
    expect_error(["resume", run, "--steps", "4"], says=("malformed training state", "trainer_state.json"),
                 inputs=(run, inputs.root))


def test_train_stopped_by_a_nan_loss_leaves_no_run_it_cannot_resume(inputs, tmp_path):
    """A nan at the first steps: no checkpoint to resume from, so no run folder is left (a new train
    -o works at once); with checkpoints, the one line says how to continue from the last."""
    out = tmp_path / "out"
    expect_error(train_args(inputs, out, "--lr", "1e30", "--quiet", steps="4"), says=("loss became nan", "lower --lr"),
                 output=out)
    run = run_copy(inputs, tmp_path)
    line = expect_error(["resume", run, "--steps", "6", "--lr", "1e30", "--quiet"], says=("loss became nan",),
                        inputs=(inputs.root,))
    assert f"the run keeps step-2: continue it with 'inrank-convert resume {run} --lr" in line
    assert (run / "step-2" / "train_state").is_dir()


# --------------------------------------------------------------------------- 6. the tokenizer


@pytest.mark.parametrize("kind", ["word-level", "other-merges"])
def test_resume_run_with_another_tokenizer(inputs, tmp_path, kind):
    other = (word_level_tokenizer if kind == "word-level" else gpt2_tokenizer_with_other_merges)(tmp_path / "tok")
    run = run_copy(inputs, tmp_path)
    expect_error(["resume", run, "--steps", "4", "--tokenizer", other], says=("tokenizer", str(other)),
                 inputs=(run, other, inputs.root))


def test_resume_run_with_its_own_tokenizer_passed_explicitly(inputs, tmp_path):
    """Control: the run's own tokenizer passed explicitly is the same tokenizer, so only --steps is wrong."""
    run = run_copy(inputs, tmp_path)
    line = expect_error(["resume", run, "--steps", "2", "--tokenizer", TOKENIZER], says=("--steps",),
                        inputs=(run, inputs.root))
    assert "tokenizer" not in line.lower(), line


def test_train_tokenizer_larger_than_vocab(inputs, tmp_path):
    config = tiny_config(tmp_path / "small-vocab", vocab_size=100, bos_token_id=0, eos_token_id=0)
    out = tmp_path / "out"
    expect_error(["train", config, "-o", out, "--data", inputs.data, "--steps", "2", *SMALL],
                 says=("tokenizer", "vocab_size", "100", "50257"), output=out, inputs=(inputs.root, config.parent))


# --------------------------------------------------------------------------- 7. the model config


def test_train_block_size_beyond_context(inputs, tmp_path):
    out = tmp_path / "out"
    expect_error(train_args(inputs, out, "--block-size", "64"), says=("--block-size", "64", "32"), output=out,
                 inputs=(inputs.root,))


def test_resume_block_size_beyond_context(inputs, tmp_path):
    out = tmp_path / "out"
    expect_error(resume_artifact_args(inputs, out, "--block-size", "64"), says=("--block-size", "64", "32"),
                 output=out, inputs=(inputs.root,))
    run = run_copy(inputs, tmp_path)
    expect_error(["resume", run, "--steps", "4", "--block-size", "64"], says=("--block-size", "64", "32"),
                 inputs=(run, inputs.root))


@pytest.mark.parametrize("key, value", [("n_embd", 64), ("n_layer", 2)])
def test_resume_run_with_an_edited_config(inputs, tmp_path, key, value):
    run = run_copy(inputs, tmp_path)
    config_file = run / "step-2" / "config.json"
    config = json.loads(config_file.read_text())
    config[key] = value
    config_file.write_text(json.dumps(config, indent=2))
    expect_error(["resume", run, "--steps", "4"], says=("config",), inputs=(run, inputs.root))


# --------------------------------------------------------------------------- 8. option values


TRAIN_BAD_OPTIONS = [
    (["--mode", "foo"], ("--mode", "foo")),
    (["--efficient", "--mode", "dense"], ("--efficient", "--mode")),
    (["--batch-size", "6", "--grad-accum", "4"], ("--batch-size", "--grad-accum")),
    (["--threshold", "1.5"], ("--threshold",)),
    (["--threshold", "0"], ("--threshold",)),
    (["--dtype", "float16"], ("float16", "--dtype")),
    (["--dtype", "int8"], ("--dtype", "int8")),
    (["--device", "tpu"], ("--device", "tpu")),
    (["--criterion", "vibes"], ("--criterion", "vibes")),
    (["--lr", "0"], ("--lr",)),
    (["--lr", "nan"], ("--lr", "nan")),
    (["--min-lr", "-1"], ("--min-lr",)),
    (["--weight-decay", "-1"], ("--weight-decay",)),
    (["--grad-clip", "-1"], ("--grad-clip",)),
    (["--seed", "99999999999999999999"], ("--seed", "4294967295")),
]


@pytest.mark.parametrize("extra, says", TRAIN_BAD_OPTIONS, ids=[" ".join(e) for e, _ in TRAIN_BAD_OPTIONS])
def test_train_bad_option_value(inputs, tmp_path, extra, says):
    out = tmp_path / "out"
    expect_error(train_args(inputs, out, "--mode", "inrank", *extra), says=says, output=out, inputs=(inputs.root,))


RESUME_BAD_OPTIONS = [
    (["--batch-size", "6", "--grad-accum", "4"], ("--batch-size", "--grad-accum")),
    (["--threshold", "1.5"], ("--threshold",)),
    (["--dtype", "float16"], ("float16", "--dtype")),
    (["--criterion", "vibes"], ("--criterion", "vibes")),
]


@pytest.mark.parametrize("source", ["artifact", "run"])
@pytest.mark.parametrize("extra, says", RESUME_BAD_OPTIONS, ids=[" ".join(e) for e, _ in RESUME_BAD_OPTIONS])
def test_resume_bad_option_value(inputs, tmp_path, source, extra, says):
    if source == "artifact":
        out = tmp_path / "out"
        expect_error(resume_artifact_args(inputs, out, *extra), says=says, output=out, inputs=(inputs.root,))
    else:
        run = run_copy(inputs, tmp_path)
        expect_error(["resume", run, "--steps", "4", *extra], says=says, inputs=(run, inputs.root))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: --device cuda is valid")
@pytest.mark.parametrize("command", ["train", "resume-artifact", "resume-run"])
def test_cuda_device_without_cuda(inputs, tmp_path, command):
    out = tmp_path / "out"
    if command == "resume-run":
        run = run_copy(inputs, tmp_path)
        expect_error(["resume", run, "--steps", "4", "--device", "cuda"], says=("cuda", "--device", "cpu"),
                     inputs=(run, inputs.root))
        return
    args = train_args(inputs, out) if command == "train" else resume_artifact_args(inputs, out)
    expect_error(args + ["--device", "cuda"], says=("cuda", "--device", "cpu"), output=out, inputs=(inputs.root,))


# --------------------------------------------------------------------------- 9. what resume is given


def test_resume_artifact_without_output(inputs):
    expect_error(["resume", inputs.artifact, "--data", inputs.data, "--steps", "2"], says=("-o",),
                 inputs=(inputs.root,))


def test_resume_path_that_does_not_exist(inputs, tmp_path):
    missing = tmp_path / "no-such-run"
    expect_error(["resume", missing, "--steps", "4"], says=(str(missing),), output=missing, inputs=(inputs.root,))
    out = tmp_path / "out"
    expect_error(["resume", missing, "-o", out, "--data", inputs.data, "--steps", "4"], says=(str(missing),),
                 output=out, inputs=(inputs.root,))


@pytest.mark.parametrize("extra", [["--init", "INIT"], ["--init-seed", "0"], ["--no-init"]],
                         ids=["init", "init-seed", "no-init"])
def test_resume_artifact_with_an_init_option(inputs, tmp_path, extra):
    extra = [inputs.run / "step-0" if part == "INIT" else part for part in extra]
    out = tmp_path / "out"
    expect_error(resume_artifact_args(inputs, out, *extra), says=("artifact", ("--init", "--no-init")), output=out,
                 inputs=(inputs.root,))


def test_resume_folder_that_is_no_checkpoint(inputs, tmp_path):
    folder = tmp_path / "just-text"
    folder.mkdir()
    (folder / "notes.txt").write_text("no model here\n")
    out = tmp_path / "out"
    expect_error(["resume", folder, "-o", out, "--data", inputs.data, "--steps", "2", "--no-init"],
                 says=(str(folder),), output=out, inputs=(inputs.root, folder))


# --------------------------------------------------------------------------- 10. the config given to train


@pytest.mark.parametrize("content, says", [
    ("{this is not json", ("config",)),
    ('{"model_type": "no-such-architecture", "n_embd": 32}', ("model_type",)),
    ('{"n_embd": 32, "n_layer": 1}', ("model_type",)),
    ('["a", "list"]', ("config",)),
], ids=["not-json", "unknown-model-type", "no-model-type", "not-an-object"])
def test_train_bad_config(inputs, tmp_path, content, says):
    folder = tmp_path / "bad-config"
    folder.mkdir()
    config = folder / "config.json"
    config.write_text(content)
    out = tmp_path / "out"
    for source in (config, folder):  # the file itself, or the folder that holds it
        expect_error(["train", source, "-o", out, "--data", inputs.data, "--steps", "2", *SMALL],
                     says=(str(config),) + says, output=out, inputs=(inputs.root, folder))


def test_train_source_without_config(inputs, tmp_path):
    out = tmp_path / "out"
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    missing = tmp_path / "no-such-config.json"
    for source, says in ((folder, (str(folder), "config")), (missing, (str(missing),))):
        expect_error(["train", source, "-o", out, "--data", inputs.data, "--steps", "2", *SMALL], says=says,
                     output=out, inputs=(inputs.root, folder))
