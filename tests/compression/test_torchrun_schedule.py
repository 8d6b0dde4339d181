"""compression/torchrun_schedule.py: the tensors dealt out over the processes (largest first, to the
least loaded, a hint chain kept on one process, rank 0's head start), and the options a torchrun job
refuses (a size or perplexity target, calibration: one process only)."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.compression.plan import TensorPlan
from inrank_convert.compression.torchrun_schedule import share_out, svd_cost
from tests.conftest import make_pair
from tests.helpers.cli_contract import expect_error


@pytest.mark.parametrize("flags", [["--target-ratio", "0.1"], ["--target-size", "100000"], ["--calibrate", "TEXT"],
                                   ["--max-perplexity-increase", "5", "--eval-text", "TEXT"]])
def test_a_global_budget_is_refused_under_torchrun(tmp_path, monkeypatch, flags):
    # As rank 0 of a two-process job sees it (the refusal comes before any process group is joined).
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    pair = make_pair(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("some text to measure " * 50)
    flags = [str(text) if flag == "TEXT" else flag for flag in flags]
    output = tmp_path / "out"
    expect_error(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", output, *flags],
                 says=(flags[0], "one process", "without torchrun"), output=output,
                 inputs=(pair.trained_dir, pair.init_dir, text))


def _entry(index: int, rows: int, cols: int, action: str = "factorize") -> tuple[int, TensorPlan]:
    return index, TensorPlan(f"t{index}", (rows, cols), torch.float32, action)


def test_share_out_deals_the_largest_tensors_first_to_the_least_loaded_process():
    work = [_entry(0, 64, 1, "dense"), _entry(1, 100, 100), _entry(2, 400, 400), _entry(3, 300, 300),
            _entry(4, 200, 200), _entry(5, 100, 100), _entry(6, 8, 8, "dense")]
    owners = share_out(work, 2)
    assert sorted(owners) == [index for index, _ in work]  # every tensor has exactly one owner
    assert owners[0] == owners[6] == 0  # kept whole: rank 0 copies them
    assert owners[2] != owners[3]  # the two largest go to different processes
    assert owners[1] == owners[5]  # one hint chain (same shape, within HINT_CHAIN): one process, in plan order
    loads = [sum(svd_cost(entry) for index, entry in work if entry.action == "factorize" and owners[index] == rank)
             for rank in range(2)]
    largest = max(svd_cost(entry) for _, entry in work)
    assert abs(loads[0] - loads[1]) <= largest  # LPT: within one chain's work of each other
    idle = share_out(work[:2], 4)  # more processes than tensors: the others get nothing
    assert set(idle.values()) == {0}
    # Rank 0 also hashes the inputs: with that head start, the first tensor goes to rank 1.
    assert share_out(work[:2], 4, head_start=svd_cost(work[1][1]))[1] == 1
