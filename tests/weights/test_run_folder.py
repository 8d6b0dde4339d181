"""weights/run_folder.py: a training-run folder's steps, the earliest the init and the latest the
trained model, ``step-N`` and ``checkpoint-N`` folders sorted by number."""

from __future__ import annotations

import shutil

import pytest

from inrank_convert.core.errors import CheckpointError
from inrank_convert.inputs.sources import open_checkpoint
from inrank_convert.weights.checkpoints import is_run_folder
from inrank_convert.weights.run_folder import resolve_run


def test_run_folder_earliest_is_init_latest_is_trained(tmp_path, gpt2_pair):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(gpt2_pair.init_dir, run / "step-0")
    shutil.copytree(gpt2_pair.init_dir, run / "step-50")
    shutil.copytree(gpt2_pair.trained_dir, run / "step-200")
    assert is_run_folder(run)
    init, trained = resolve_run(run)
    assert (init.name, trained.name) == ("step-0", "step-200")
    with pytest.raises(CheckpointError, match="training-run folder"):
        open_checkpoint(run)


def test_checkpoint_n_folders_sort_numerically(tmp_path, gpt2_pair):
    run = tmp_path / "run"
    for step in (900, 1000, 50):
        shutil.copytree(gpt2_pair.init_dir, run / f"checkpoint-{step}")
    assert [p.name for p in resolve_run(run)] == ["checkpoint-50", "checkpoint-1000"]
