"""training/checkpoint.py: an InRank run's step folders are artifacts that inspect, report and
decompress read, their LowRankLinear model computing the merged one; the optimizer's moments saved by
parameter name and put back into a rebuilt model, so that the next step is the same step."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from inrank_convert.artifact import describe_artifact
from inrank_convert.core.errors import CheckpointError
from inrank_convert.export.dense import decompress
from inrank_convert.runtime.modeling import load_compressed
from inrank_convert.training.checkpoint import load_optimizer_tensors, optimizer_tensors
from tests.helpers.training import HAS_DATA

needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer and Tiny Shakespeare)")


@needs_data
def test_checkpoints_are_artifacts_that_inspect_report_and_decompress_read(inrank_run, tmp_path):
    run, _ = inrank_run
    described = describe_artifact(run / "step-12")
    assert described["reference"] == "seed"
    kinds = {layer["name"]: layer["kind"] for layer in described["layers"]}
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "lowrank"
    assert described["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    decompress(run / "step-12", tmp_path / "dense")
    model = load_compressed(run / "step-12")
    dense = load_compressed(run / "step-12", merge=True)
    ids = torch.arange(16)[None]
    assert torch.allclose(model(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()


def test_the_optimizer_state_survives_a_rebuilt_model(tmp_path):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    model, optimizer = _model_and_optimizer()
    for _ in range(3):
        _step(model, optimizer, x)
    tensors = optimizer_tensors(model, optimizer)
    assert set(tensors) == {f"optimizer.{name}.{key}" for name, _ in model.named_parameters()
                            for key in ("step", "exp_avg", "exp_avg_sq")}
    assert torch.equal(tensors["optimizer.2.weight.exp_avg"], optimizer.state[model[2].weight]["exp_avg"])

    save_file(tensors, str(tmp_path / "state.safetensors"))  # as a checkpoint keeps them

    rebuilt, fresh = _model_and_optimizer(seed=5)  # other values, other parameter objects
    rebuilt.load_state_dict(model.state_dict())
    load_optimizer_tensors(rebuilt, fresh, load_file(str(tmp_path / "state.safetensors")))
    _step(model, optimizer, x)
    _step(rebuilt, fresh, x)
    for (name, expected), (_, got) in zip(model.named_parameters(), rebuilt.named_parameters(), strict=True):
        assert torch.equal(got, expected), name  # the same step: moments and step count came back


def test_moments_of_another_shape_are_refused():
    model, optimizer = _model_and_optimizer()
    _step(model, optimizer, torch.ones(2, 6))
    tensors = optimizer_tensors(model, optimizer)
    tensors["optimizer.0.weight.exp_avg"] = torch.zeros(5, 7)
    rebuilt, fresh = _model_and_optimizer()
    with pytest.raises(CheckpointError, match=r"optimizer state 0\.weight\.exp_avg has shape \[5, 7\], the parameter \[5, 6\]"):
        load_optimizer_tensors(rebuilt, fresh, tensors)
