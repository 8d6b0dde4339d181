"""Tiny real models and what their layers see, for the calibration and whitening tests: the trained
model of a conftest pair, every Linear/Conv1D layer's inputs captured whole (the direct oracle), and
the output error of a weight residual. conftest's ``shakespeare_ids`` is the text they run on."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from tests.conftest import SHARED_DATA, make_pair

TEXT = SHARED_DATA / "tinyshakespeare" / "input.txt"


GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"


WINDOW = 64  # the fixture models' context (n_positions / max_position_embeddings)


VOCAB = 320


needs_text = pytest.mark.skipif(not TEXT.is_file(), reason=f"Tiny Shakespeare absent under {SHARED_DATA}")


def trained_model(tmp_path, arch: str):
    pair = make_pair(tmp_path, arch)
    return pair, AutoModelForCausalLM.from_pretrained(pair.trained_dir)


def linear_layers(model) -> dict[str, torch.nn.Module]:
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


@torch.no_grad()
def captured_inputs(model, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every Linear/Conv1D layer's inputs ([rows, in], float64), kept whole: the direct oracle."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in linear_layers(model).items():
        def hook(module, args, name=name):
            seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
        handles.append(module.register_forward_pre_hook(hook))
    model.eval()
    for batch in batches:
        model(batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


def output_error(X: torch.Tensor, residual: torch.Tensor, conv1d: bool) -> float:
    """||layer output error|| on inputs X of a weight residual in its stored orientation."""
    return float(torch.linalg.matrix_norm(X @ (residual if conv1d else residual.T)))


def plain_truncation(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


@torch.no_grad()
def recorded_output_errors(pair, artifact, text: str, tokenizer, tokens: int) -> dict[str, tuple[float, float]]:
    """weight name -> (the output error the artifact records, the one measured directly): the
    relative error of the layer's outputs ||X (W_trained - W_read)|| / ||X (W_trained - W_init)||
    on the inputs X the trained model's layer sees over ``text``'s first ``tokens`` tokens, in the
    calibration's windows (whole windows of the context, then the rest), with the weights the
    artifact's readers rebuild (``Artifact.reconstruct``). Only the entries that record one."""
    from inrank_convert.artifact import read_manifest
    from inrank_convert.inputs.sources import open_artifact
    from inrank_convert.inputs.text import load_tokenizer, tokenize_text

    ids = tokenize_text(text, load_tokenizer(None, tokenizer), tokens)[:tokens]
    windows = list(ids.split(WINDOW))
    model = AutoModelForCausalLM.from_pretrained(pair.trained_dir)
    inputs = captured_inputs(model, [window[None] for window in windows])
    layers = linear_layers(model)
    found = {}
    with open_artifact(artifact) as read:
        for name, entry in read_manifest(artifact).tensors.items():
            if entry.output_error is None:
                continue
            conv1d = isinstance(layers[name], Conv1D)
            trained, init = pair.trained_state[name].double(), pair.init_state[name].double()
            measured = output_error(inputs[name], trained - read.reconstruct(name).double(), conv1d) \
                / output_error(inputs[name], trained - init, conv1d)
            found[name] = (entry.output_error, measured)
    return found
