"""Scale distillation (``compress --calibrate TEXT --distill-scales N``) on tiny real models: only
the stored scales change, the KL the record reports is the one a reader's model has, a distillation
that does not lower it is dropped, and what cannot be distilled is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from inrank_convert import PlanOptions, compress, load_compressed
from inrank_convert.artifact import read_manifest
from inrank_convert.artifact.format import ARTIFACT_FILE
from inrank_convert.artifact.storage import SCALE_SUFFIXES
from inrank_convert.compression import distill
from inrank_convert.compression.job import CalibrationRequest
from inrank_convert.inputs.text import load_tokenizer, tokenize_text
from inrank_convert.runtime.modeling import load_dense, model_config
from tests.conftest import RIVER_TEXT, ModelPair, build_model, gpt2_config, llama_config, save_hf, train_state
from tests.helpers.calibration import recorded_output_errors
from tests.helpers.cli_contract import expect_error, expect_ok

TOKENS = 4096
STEPS = 10


@pytest.fixture
def river(tmp_path) -> Path:
    path = tmp_path / "river.txt"
    path.write_text(RIVER_TEXT)
    return path


def sharp_pair(tmp_path: Path, arch: str) -> ModelPair:
    """conftest's model pair, but initialized 10x wider (initializer_range 0.2): the tiny models'
    next-token distributions are then far from uniform, so that a compressed model's KL to the
    trained one (~1e-3 nats) stands well above float32 rounding."""
    config = (gpt2_config if arch == "gpt2" else llama_config)(initializer_range=0.2)
    model = build_model(config, 7)
    init_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if arch == "gpt2":  # keep the tie of the model's own state dict
        init_state["lm_head.weight"] = init_state["transformer.wte.weight"]
    trained_state = train_state(init_state)
    return ModelPair(arch, config, save_hf(model, init_state, tmp_path / f"{arch}-init"),
                     save_hf(model, trained_state, tmp_path / f"{arch}-trained"), init_state, trained_state, 7)


def compressed(pair, out: Path, quantize: str, text: Path, tokenizer: Path, steps: int = 0) -> Path:
    compress(pair.trained_dir, out, init=pair.init_dir, options=PlanOptions(target_ratio=0.3, quantize=quantize),
             calibration=CalibrationRequest(text, TOKENS, tokenizer, steps))
    return out


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / ARTIFACT_FILE, "pt") as file:
        return {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 - safe_open has no __iter__


@torch.no_grad()
def measured_kl(pair, artifact: Path, tokenizer: Path) -> float:
    """Mean KL(trained || compressed) per token on the windows the distillation measures, with the
    models every reader builds (the dense trained model, ``load_compressed``)."""
    window = pair.config.n_positions if pair.arch == "gpt2" else pair.config.max_position_embeddings
    ids = tokenize_text(RIVER_TEXT, load_tokenizer(None, tokenizer), TOKENS)
    windows = ids[:ids.numel() // window * window].reshape(-1, window)[:distill.MEASURE_WINDOWS]
    assert windows.shape[0] >= 4, windows.shape
    teacher = load_dense(pair.trained_dir, model_config(pair.trained_dir)).eval()
    student = load_compressed(artifact)
    log_p = torch.log_softmax(teacher(windows).logits, dim=-1)
    log_q = torch.log_softmax(student(windows).logits, dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(dim=-1).mean())


@pytest.mark.parametrize(("arch", "quantize"), [("gpt2", "int8"), ("gpt2", "int4"), ("llama", "mixed")])
def test_distillation_changes_only_scales_and_lowers_the_kl_a_reader_measures(tmp_path, river, tokenizer_file,
                                                                              arch, quantize, monkeypatch):
    """Two distillations of the same compress (the same allocation: the record's room in the header
    is the same): one at an absurd learning rate (steps of e^3 on every scale), which must be dropped,
    leaving the scales compress encoded; one at the default, which must be kept."""
    pair = sharp_pair(tmp_path, arch)
    with monkeypatch.context() as patch:
        patch.setattr(distill, "DISTILL_LR", 3.0)
        dropped = compressed(pair, tmp_path / "dropped", quantize, river, tokenizer_file, STEPS)
    distilled = compressed(pair, tmp_path / "distilled", quantize, river, tokenizer_file, STEPS)
    failed, record = (read_manifest(folder).calibration["distill"] for folder in (dropped, distilled))
    assert not failed["kept"] and failed["learning_rate"] == 3.0
    assert failed["kl_after"] is None or failed["kl_after"] > failed["kl_before"]  # None: NaN or Inf
    assert record["steps"] == STEPS and record["tensors"] > 0 and record["scales"] > 0
    assert record["kept"] and record["kl_after"] < 0.97 * record["kl_before"], record
    assert record["kl_before"] == failed["kl_before"]
    # The KLs recorded are those of the models a reader builds: the dropped artifact is compress's own.
    assert measured_kl(pair, dropped, tokenizer_file) == pytest.approx(record["kl_before"], rel=1e-2)
    assert measured_kl(pair, distilled, tokenizer_file) == pytest.approx(record["kl_after"], rel=1e-2)
    # The same tensors, shapes and dtypes (the same bytes); the codes as they were, some scales trained.
    before, after = stored_tensors(dropped), stored_tensors(distilled)
    assert before.keys() == after.keys()
    changed = set()
    for name, tensor in before.items():
        assert (after[name].shape, after[name].dtype) == (tensor.shape, tensor.dtype), name
        if not torch.equal(after[name], tensor):
            changed.add(name)
    assert changed and all(name.endswith(SCALE_SUFFIXES) for name in changed), sorted(changed)[:5]
    # Each kept tensor's error was measured again: verify holds the reconstruction to the new one.
    errors_before = {name: entry.error for name, entry in read_manifest(dropped).tensors.items()}
    errors_after = {name: entry.error for name, entry in read_manifest(distilled).tensors.items()}
    assert any(errors_after[name] != errors_before[name] for name in errors_before if errors_before[name])
    # and so was each calibrated layer's output error: the one its outputs on the text see.
    outputs = [recorded_output_errors(pair, folder, RIVER_TEXT, tokenizer_file, TOKENS) for folder in (dropped, distilled)]
    for found in outputs:
        assert found and all(recorded == pytest.approx(measured, rel=2e-3, abs=1e-6)
                             for recorded, measured in found.values()), found
    assert any(outputs[1][name][0] != recorded for name, (recorded, _) in outputs[0].items())
    for folder in (dropped, distilled):
        assert "verify: OK" in expect_ok(["verify", folder]).stdout
    shown = expect_ok(["inspect", distilled]).stdout
    assert f"scales distilled {STEPS} steps" in shown and ", kept" in shown
    assert "not kept" in expect_ok(["inspect", dropped]).stdout


def test_distill_scales_bad_input(gpt2_pair, river, tokenizer_file, tmp_path):
    out = tmp_path / "out"
    source = [gpt2_pair.trained_dir, "--init", gpt2_pair.init_dir, "-o", out]
    calibrated = ["--calibrate", river, "--tokenizer", tokenizer_file]
    cases = [
        (["--target-ratio", "0.3", "--distill-scales", "5"], ("--distill-scales", "--calibrate")),
        ([*calibrated, "--target-ratio", "0.3", "--distill-scales", "0"], ("--distill-scales", "1 or more")),
        ([*calibrated, "--target-ratio", "0.3", "--distill-scales", "5", "--quantize", "none"], ("--quantize", "floats")),
        ([*calibrated, "--target-ratio", "0.3", "--distill-scales", "5", "--dtype", "float16"], ("--dtype", "floats")),
        ([*calibrated, "--max-perplexity-increase", "1", "--eval-text", river, "--distill-scales", "5"],
         ("--distill-scales", "--target-size")),
    ]
    for flags, says in cases:
        expect_error(["compress", *source, *flags], says, output=out, inputs=(gpt2_pair.trained_dir, river))
