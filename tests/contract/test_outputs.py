"""Outputs never clobber, signals and full disks leave nothing behind: one writer per output (a
second gets one line naming the first), a live writer's temporary folder is never removed, an
output that appears meanwhile is not replaced, ``-o ''`` / ``.`` / ``..`` and an ``-o`` through a
symlink into an input are refused before any work, SIGTERM mid-compress and mid-train, and a full
disk (a small tmpfs, where this machine lets the test mount one). Through the real CLI, in
subprocesses where another process or a signal is the point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inrank_convert.core.errors import OutputError
from inrank_convert.weights.output_lock import lock_path
from inrank_convert.weights.outputs import TMP_PREFIX, atomic_output_dir
from tests.conftest import REPO, make_pair, snapshot
from tests.contract.test_bad_input import _big_pair
from tests.helpers.cli_contract import expect_error, expect_ok, signalled_cli, temps_beside
from tests.helpers.training import HAS_DATA, TEXT, TOKENIZER
from tests.training.conftest import run_config

HOLD = """
import sys, time
from inrank_convert.weights.output_lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("outputs"), "gpt2")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    return run_config(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="module")
def artifact(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs-artifact") / "artifact"
    expect_ok(_compress(pair, out))
    return out


def _compress(pair, out, *extra) -> list:
    return ["compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, "--quiet", *extra]


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding the lock of ``out`` (as a compress writing it would)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_of_the_same_output_is_refused(pair, tmp_path):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        for args in (_compress(pair, out), _compress(pair, out, "--force")):
            expect_error(args, says=("being written by process", str(holder.pid), str(out)), output=out,
                         inputs=(pair.trained_dir, pair.init_dir))
    finally:
        holder.kill()
        holder.wait()
    expect_ok(_compress(pair, out))  # the lock died with its process
    assert (out / "inrank.safetensors").is_file() and not lock_path(out).exists()


def test_two_compresses_to_one_output_at_once(tmp_path):
    """Two real compresses started together: the one that takes the lock writes the output, the
    other stops at once in one line naming it (before, both exited 0 and one replaced the other)."""
    init, trained = _big_pair(tmp_path, count=12)  # exact SVDs of 12 1024 x 1024 updates: the first is still
    out = tmp_path / "out"                          # working when the second has started up
    command = [sys.executable, "-m", "inrank_convert", "compress", str(trained), "--init", str(init), "-o", str(out),
               "--svd", "exact", "--quiet"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not lock_path(out).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        _, first_err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, first_err
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and f"being written by process {first.pid}" in second.stderr
    assert (out / "inrank.safetensors").is_file() and temps_beside(out) == []


def test_a_live_writers_temporary_folder_is_spared(pair, tmp_path):
    """A writer of ``out`` holds its lock: a second writer neither starts nor touches its temporary
    folder. Another output's temporary folder, however alike its name, is never removed; a dead
    writer's temporary folder of the same output is removed by the next writer."""
    out = tmp_path / "out"
    live = tmp_path / f"{TMP_PREFIX}out.{'a' * 32}"
    live.mkdir()
    (live / "inrank.safetensors").write_bytes(b"partial")
    holder = _holder(out)
    try:
        expect_error(_compress(pair, out), says=("being written by process",), output=out)
        assert (live / "inrank.safetensors").read_bytes() == b"partial"
    finally:
        holder.kill()
        holder.wait()
    other = tmp_path / f"{TMP_PREFIX}out-2.{'b' * 32}"  # output "out-2": its name starts like "out"'s
    other.mkdir()
    expect_ok(_compress(pair, out))
    assert not live.exists(), "the dead writer's temporary folder of the same output should be gone"
    assert other.is_dir(), "another output's temporary folder was removed"


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while this command ran"):
        with atomic_output_dir(out) as temp:
            (temp / "result").write_text("new")
            out.mkdir()
            (out / "theirs").write_text("kept")
    assert (out / "theirs").read_text() == "kept" and not (out / "result").exists()
    assert temps_beside(out) == []
    with atomic_output_dir(out, force=True) as temp:  # --force, lock held: replaced
        (temp / "result").write_text("new")
    assert (out / "result").read_text() == "new" and not (out / "theirs").exists()


@pytest.mark.parametrize("given", ["", ".", "..", "./"])
def test_the_current_folder_is_never_an_output(pair, artifact, tmp_path, monkeypatch, given):
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    for args in (_compress(pair, given, "--force"), ["decompress", artifact, "-o", given, "--force"],
                 ["export-peft", artifact, "-o", given, "--force"]):
        expect_error(args, says=("current folder",), inputs=(here, tmp_path / "work"))
    assert (here / "notes.txt").read_text() == "mine"


def test_an_output_through_a_symlink_into_an_input_is_refused(pair, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(pair.trained_dir, target_is_directory=True)
    out = link / "sub"
    expect_error(_compress(pair, out), says=("inside the input folder",), output=out,
                 inputs=(pair.trained_dir, pair.init_dir))
    over = tmp_path / "over"
    over.symlink_to(pair.init_dir, target_is_directory=True)
    expect_error(_compress(pair, over, "--force"), says=("overwrite an input",), inputs=(pair.init_dir,))


def test_sigterm_mid_compress_is_one_line_and_leaves_nothing(tmp_path):
    init, trained = _big_pair(tmp_path)
    out = tmp_path / "out"
    before = {init: snapshot(init), trained: snapshot(trained)}
    args = ["compress", trained, "--init", init, "-o", out, "--svd", "exact", "--quiet"]
    code, stderr = signalled_cli(args, lambda: bool(temps_beside(out)), signal.SIGTERM, settle=0.3)
    assert code == 143, stderr
    assert stderr == "error: terminated (SIGTERM); nothing was written\n", stderr
    assert not os.path.lexists(out) and temps_beside(out) == [] and not lock_path(out).exists()
    assert {init: snapshot(init), trained: snapshot(trained)} == before


@pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer and Tiny Shakespeare)")
def test_sigterm_mid_train_saves_a_checkpoint_the_run_resumes_from(tmp_path, config_path):
    run = tmp_path / "run"
    args = ["train", config_path, "-o", run, "--data", TEXT, "--tokenizer", TOKENIZER, "--steps", "400",
            "--batch-size", "4", "--block-size", "16", "--log-every", "1", "--seed", "3"]
    code, stderr = signalled_cli(args, (run / "metrics.jsonl").is_file, signal.SIGTERM, settle=0.5, timeout=120)
    assert code in (130, 143), stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: interrupted at step") and "Traceback" not in stderr, stderr
    stopped = int(line.split("interrupted at step ")[1].split(";")[0])
    expect_ok(["resume", run, "--steps", stopped + 2, "--quiet"])
    assert (run / f"step-{stopped + 2}" / "train_state").is_dir()


@pytest.fixture
def small_disk(tmp_path):
    """A 32 KiB tmpfs (skipped where this machine does not let the test mount one): smaller than what
    each command below writes (the artifact alone is 37 KB)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_leaves_nothing(pair, artifact, small_disk):
    says = ("no space left on the device", "free there")
    for args, out in ((_compress(pair, small_disk / "out"), small_disk / "out"),
                      (["decompress", artifact, "-o", small_disk / "dense"], small_disk / "dense"),
                      (["export-peft", artifact, "-o", small_disk / "adapter"], small_disk / "adapter")):
        line = expect_error(args, says=(*says, str(out)), output=out, inputs=(pair.trained_dir, artifact))
        assert "nothing was kept" in line
    assert sorted(p.name for p in small_disk.iterdir()) == []


@pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer and Tiny Shakespeare)")
def test_train_on_a_full_disk_leaves_no_run_folder(small_disk, config_path):
    run = small_disk / "run"
    expect_error(["train", config_path, "-o", run, "--data", TEXT, "--tokenizer", TOKENIZER, "--steps", "2",
                  "--batch-size", "2", "--block-size", "16", "--quiet"],
                 says=("no space left on the device", str(run)), output=run)
    assert sorted(p.name for p in small_disk.iterdir()) == []
