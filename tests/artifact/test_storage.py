"""artifact/storage.py: low-precision storage (format versions 2 to 4): its encodings on their
own, then whole artifacts on tiny real models: int8 by default, bfloat16, float32 at threshold 1,
``--dtype``, ``--quantize int4`` and lowrank+rows tensors, each run from the artifact and from its
decompressed folder, and checked by ``verify``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from inrank_convert.artifact import FORMAT_VERSION, TensorEntry, describe_artifact, read_manifest
from inrank_convert.artifact.bands import GROUP_SIZE, INT4, pack_codes, unpack_codes
from inrank_convert.artifact.fields import ManifestFormatError
from inrank_convert.artifact.storage import (
    INT4_LEAD,
    INT8_LEVELS,
    QUANTIZE_SCHEMES,
    SCALE_SUFFIXES,
    InputGram,
    decode_factors,
    decode_rows,
    element_bytes,
    encode_factors,
    encode_rows,
    factors_layout,
    read_factors,
    read_rows,
    read_update,
    round_trip,
    scaled_update,
    storage_costs,
    stored_factors,
    stored_rows,
    stored_update,
    unscaled_update,
    vector_overhead,
)
from inrank_convert.cli import app
from inrank_convert.core.tensors import SAFETENSORS_CODES
from inrank_convert.linalg.forms import Costs
from inrank_convert.runtime.modeling import load_compressed
from tests.conftest import ModelPair, build_model, gpt2_config, make_pair
from tests.helpers.rows import plant_rows

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits, round to nearest
FP16_UNIT_ROUNDOFF = 2.0**-11
SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8"}


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


# --------------------------------------------------------------------------- encodings


def test_storage_sizes():
    assert QUANTIZE_SCHEMES == ("int8", "int4", "mixed")
    assert [element_bytes(s) for s in ("float64", "float32", "float16", "bfloat16", "int8")] == [8, 4, 2, 2, 1]
    assert vector_overhead("int8") == 4  # a float32 scale per component / row
    assert all(vector_overhead(s) == 0 for s in ("float32", "float16", "bfloat16"))


@pytest.mark.parametrize("storage, roundoff", [("bfloat16", BF16_UNIT_ROUNDOFF), ("float16", FP16_UNIT_ROUNDOFF),
                                               ("float32", 0.0)])
def test_float_round_trip_is_within_unit_roundoff(storage, roundoff):
    B, A, rows = gaussian(300, 6, seed=1), gaussian(6, 50, seed=2), gaussian(20, 50, seed=3)
    B_s, A_s, scale = encode_factors(B, A, storage)
    assert scale is None
    assert B_s.dtype == A_s.dtype == getattr(torch, storage)
    rows_s, row_scale = encode_rows(rows, storage)
    assert row_scale is None and rows_s.dtype == getattr(torch, storage)
    B_back, A_back = decode_factors(B_s, A_s, scale)
    rows_back = decode_rows(rows_s, row_scale)
    assert B_back.dtype == A_back.dtype == rows_back.dtype == torch.float32
    for back, exact in ((B_back, B), (A_back, A), (rows_back, rows)):
        # Every number rounds by at most the unit roundoff, relative to itself (no subnormals here).
        assert bool(((back - exact).abs() <= roundoff * exact.abs()).all())
    if storage == "bfloat16":  # and the rounding is real: not a float32 copy
        assert float((B_back - B).abs().max()) > 0
    product_error = relative_error(B_back @ A_back, B @ A)
    assert product_error <= 3 * roundoff + 1e-7
    assert [t.tolist() for t in round_trip(B, A, rows, storage)] == [B_back.tolist(), A_back.tolist(),
                                                                      rows_back.tolist()]


def test_int8_factors_have_one_float32_scale_per_component():
    rows, rank, cols = 400, 5, 64
    # Components of very different sizes: each needs its own scale.
    B = gaussian(rows, rank, seed=4) * torch.tensor([100.0, 1.0, 0.01, 3.0, 0.5])
    A = gaussian(rank, cols, seed=5) * torch.tensor([0.1, 10.0, 1.0, 2.0, 0.3])[:, None]
    q_B, q_A, scale = encode_factors(B, A, "int8")
    assert q_B.dtype == q_A.dtype == torch.int8 and q_B.shape == B.shape and q_A.shape == A.shape
    assert scale.dtype == torch.float32 and scale.shape == (rank,)
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    # absmax quantization: every B column and every A row reaches +-127 exactly.
    assert q_B.abs().amax(dim=0).tolist() == [INT8_LEVELS] * rank
    assert q_A.abs().amax(dim=1).tolist() == [INT8_LEVELS] * rank
    assert int(q_B.abs().max()) <= INT8_LEVELS and int(q_A.abs().max()) <= INT8_LEVELS
    B_back, A_back = decode_factors(q_B, q_A, scale)
    assert B_back.dtype == A_back.dtype == torch.float32

    # Per component j, with e_B, e_A each element at most half a step (absmax / 254) off:
    # ||B_j A_j - B'_j A'_j|| <= ||B_j|| ||e_A|| + ||e_B|| ||A_j|| + ||e_B|| ||e_A||.
    bound = 0.0
    for j in range(rank):
        b, a = B[:, j].double(), A[j].double()
        e_b = rows**0.5 * float(b.abs().max()) / (2 * INT8_LEVELS)
        e_a = cols**0.5 * float(a.abs().max()) / (2 * INT8_LEVELS)
        bound += float(b.norm()) * e_a + e_b * float(a.norm()) + e_b * e_a
        component = torch.outer(B_back[:, j], A_back[j]).double()
        assert float((component - torch.outer(b, a)).norm()) <= (float(b.norm()) * e_a + e_b * float(a.norm())
                                                                 + e_b * e_a) * (1 + 1e-5)
    exact = (B.double() @ A.double())
    assert float((B_back.double() @ A_back.double() - exact).norm()) <= bound * (1 + 1e-5)
    # Stated bound for Gaussian factors: the product within 3% (measured about 1%).
    assert relative_error(B_back @ A_back, exact) < 0.03


def test_int8_factors_decode_balanced():
    """Each decoded component's B column and A row have equal norms, as compress's balanced factors
    had, with the same product as the scale on one side: a resumed run trains from them."""
    B = gaussian(300, 4, seed=6) * torch.tensor([0.01, 1.0, 5.0, 0.2])
    A = gaussian(4, 90, seed=7) * torch.tensor([3.0, 0.5, 1.0, 40.0])[:, None]
    q_B, q_A, scale = encode_factors(B, A, "int8")
    B_back, A_back = decode_factors(q_B, q_A, scale)
    assert torch.allclose(B_back.norm(dim=0), A_back.norm(dim=1), rtol=1e-5)
    one_sided = (q_B.double() * scale.double()[None, :]) @ q_A.double()
    assert relative_error(B_back.double() @ A_back.double(), one_sided) < 1e-6
    # The stored integers' scale on one side would leave A at up to 127 and B near 0.
    assert float(q_A.abs().max()) == INT8_LEVELS and float(A_back.abs().max()) < 20


def test_int8_rows_have_one_float32_scale_per_row():
    rows = gaussian(30, 64, seed=6) * torch.logspace(-3, 3, 30)[:, None]
    q, scale = encode_rows(rows, "int8")
    assert q.dtype == torch.int8 and q.shape == rows.shape
    assert scale.dtype == torch.float32 and scale.shape == (30,)
    assert q.abs().amax(dim=1).tolist() == [INT8_LEVELS] * 30
    back = decode_rows(q, scale)
    assert back.dtype == torch.float32
    step = rows.abs().amax(dim=1, keepdim=True) / INT8_LEVELS
    assert bool(((back - rows).abs() <= step / 2 * (1 + 1e-5)).all())  # half a step, row by row
    for k in range(30):  # so even the smallest row keeps its own relative precision
        assert relative_error(back[k], rows[k]) < 0.03


def test_int8_all_zero_column_row_and_stored_row_give_no_nan():
    B, A, rows = gaussian(40, 3, seed=7), gaussian(3, 16, seed=8), gaussian(5, 16, seed=9)
    B[:, 1] = 0.0  # a component whose B column is all zero
    A[2] = 0.0  # and one whose A row is
    rows[3] = 0.0  # a stored row that is all zero
    q_B, q_A, scale = encode_factors(B, A, "int8")
    q_rows, row_scale = encode_rows(rows, "int8")
    for tensor in (scale, row_scale):
        assert bool(torch.isfinite(tensor).all())
    B_back, A_back, rows_back = round_trip(B, A, rows, "int8")
    for tensor in (B_back, A_back, rows_back, B_back @ A_back):
        assert bool(torch.isfinite(tensor).all())
    assert int(q_B[:, 1].abs().max()) == 0 and int(q_A[2].abs().max()) == 0 and int(q_rows[3].abs().max()) == 0
    assert float(B_back[:, 1].abs().max()) == 0.0 and float((B_back[:, 2:3] @ A_back[2:3]).abs().max()) == 0.0
    assert float(rows_back[3].abs().max()) == 0.0
    assert relative_error(B_back @ A_back, B @ A) < 0.03


def test_int8_of_an_all_zero_factor_pair():
    q_B, q_A, scale = encode_factors(torch.zeros(8, 2), torch.zeros(2, 5), "int8")
    B_back, A_back = decode_factors(q_B, q_A, scale)
    assert bool(torch.isfinite(scale).all())
    assert float((B_back @ A_back).abs().max()) == 0.0


# --------------------------------------------------------------------------- models and artifacts


def run_cli(*args) -> object:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
    return result


ROWS_TENSORS = {"gpt2": ("transformer.wte.weight",), "llama": ("model.embed_tokens.weight", "lm_head.weight")}


class Workshop:
    """Pairs and artifacts made once per module, on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.pairs: dict[str, ModelPair] = {}
        self.artifacts: dict[str, Path] = {}

    def pair(self, label: str) -> ModelPair:
        """``gpt2`` / ``llama``: conftest's pairs; ``gpt2-rows`` / ``llama-rows``: the same with
        rows planted in the embedding (and LLaMA's untied head)."""
        if label not in self.pairs:
            arch, _, rows = label.partition("-")
            folder = self.root / label
            folder.mkdir()
            pair = make_pair(folder, arch)
            if rows:
                for seed, name in enumerate(ROWS_TENSORS[arch]):
                    plant_rows(pair, name, seed=seed)
            self.pairs[label] = pair
        return self.pairs[label]

    def artifact(self, label: str, *options: str) -> Path:
        key = f"{label}{''.join(options)}"
        if key not in self.artifacts:
            pair = self.pair(label)
            out = self.root / f"artifact-{len(self.artifacts)}"
            run_cli("compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, "--quiet", *options)
            self.artifacts[key] = out
        return self.artifacts[key]


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Workshop:
    return Workshop(tmp_path_factory.mktemp("storage"))


def header_dtypes(artifact: Path) -> dict[str, tuple[str, list[int]]]:
    with safe_open(str(artifact / "inrank.safetensors"), framework="pt") as handle:
        return {name: (handle.get_slice(name).get_dtype(), list(handle.get_slice(name).get_shape()))
                for name in handle.keys()}


def factorized(artifact: Path) -> dict:
    entries = {name: entry for name, entry in read_manifest(artifact).tensors.items() if entry.has_factors}
    assert entries, f"{artifact} has no factorized tensor"
    return entries


def stored_bytes(header: dict, names) -> int:
    size = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I64": 8}
    total = 0
    for name in names:
        dtype, shape = header[name]
        total += size[dtype] * int(torch.tensor(shape).prod())
    return total


MIXED = ("--quantize", "mixed", "--target-ratio", "0.3")
CASES = {  # label, compress options (int8 is the default storage)
    "gpt2-bf16": ("gpt2", ("--quantize", "none")),
    "gpt2-int8": ("gpt2", ()),
    "llama-bf16": ("llama", ("--quantize", "none")),
    "llama-int8": ("llama", ()),
    "gpt2-rows": ("gpt2-rows", ("--quantize", "none")),
    "gpt2-rows-int8": ("gpt2-rows", ()),
    "llama-rows": ("llama-rows", ()),
    "gpt2-int4": ("gpt2", ("--quantize", "int4")),
    "gpt2-rows-int4": ("gpt2-rows", ("--quantize", "int4")),
    "llama-rows-int4": ("llama-rows", ("--quantize", "int4")),
    "gpt2-mixed": ("gpt2", MIXED),
    "gpt2-rows-mixed": ("gpt2-rows", MIXED),
    "llama-rows-mixed": ("llama-rows", MIXED),
}


@pytest.mark.parametrize("case", list(CASES))
def test_artifact_runs_like_its_decompressed_folder(shop, tmp_path, case):
    from transformers import AutoModelForCausalLM

    label, options = CASES[case]
    artifact = shop.artifact(label, *options)
    entries = factorized(artifact)
    if label.endswith("-rows"):
        assert {entries[name].kind for name in ROWS_TENSORS[label.split("-")[0]]} == {"lowrank+rows"}
    dense = tmp_path / "dense"
    run_cli("decompress", artifact, "-o", dense, "--quiet")
    pair = shop.pair(label)
    ids = torch.randint(0, pair.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    compressed = load_compressed(artifact)
    reloaded = AutoModelForCausalLM.from_pretrained(dense).eval()
    with torch.no_grad():
        expected = reloaded(ids).logits
        got = compressed(ids).logits
    scale = float(expected.abs().max())
    assert scale > 0
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * scale), float((got - expected).abs().max()) / scale
    # And it is the compressed model, not the original: factorized layers changed something.
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(pair.trained_dir).eval()(ids).logits
    assert not torch.allclose(original, expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("case", list(CASES))
def test_verify_measures_errors_within_the_recorded_ones(shop, case):
    label, options = CASES[case]
    artifact = shop.artifact(label, *options)
    entries = factorized(artifact)
    verified = json.loads(run_cli("verify", artifact, "--json").stdout)
    assert verified["ok"] and verified["checksums_ok"] and verified["reference_ok"] and verified["source_checked"]
    layers = {layer["name"]: layer for layer in verified["layers"]}
    assert set(entries) <= set(layers)
    for name, entry in entries.items():
        layer = layers[name]
        assert entry.error is not None and 0 < entry.error < 1
        assert layer["expected_error"] == pytest.approx(entry.error)
        # The recorded error is the stored one, rounding included: measured equals it (within float
        # noise and the 8 digits the manifest keeps), and never exceeds it.
        assert layer["measured_error"] <= entry.error * (1 + 1e-4) + 1e-7, name
        assert layer["measured_error"] == pytest.approx(entry.error, rel=1e-3), name
        # ... and it is at least the truncation's error, up to the recorded energy's own precision
        # (the Gram engine's float32 spectrum: ~1e-6 of the total, which matters when the tail is tiny).
        assert entry.error ** 2 >= (1 - entry.energy) * (1 - 2e-3) - 1e-6, name
    for layer in verified["layers"]:
        if layer["name"] not in entries and layer["kind"] == "dense":
            assert layer["measured_error"] == 0.0, layer


def test_default_compress_stores_int8_as_quantize_int8_does(shop):
    default, named = shop.artifact("gpt2-rows"), shop.artifact("gpt2-rows", "--quantize", "int8")
    entries = factorized(default)
    assert "lowrank+rows" in {entry.kind for entry in entries.values()}
    assert all(entry.storage == "int8" for entry in entries.values()), entries
    stored, expected = load_file(default / "inrank.safetensors"), load_file(named / "inrank.safetensors")
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[name], expected[name]) for name in stored)


def test_quantize_none_stores_bfloat16(shop):
    artifact = shop.artifact("gpt2-rows", "--quantize", "none")
    header = header_dtypes(artifact)
    manifest = read_manifest(artifact)
    assert manifest.version == FORMAT_VERSION == 4
    entries = factorized(artifact)
    assert "lowrank+rows" in {entry.kind for entry in entries.values()}
    for name, entry in entries.items():
        assert entry.storage == "bfloat16", name
        names = entry.stored_names(name)
        assert all(header[stored][0] == "BF16" for stored in names if not stored.endswith(".row_index")), name
        if entry.kind == "lowrank+rows":
            assert header[name + ".row_index"] == ("I64", [entry.rows])
            assert header[name + ".rows"] == ("BF16", [entry.rows, entry.shape[1]])
        assert not any(stored.endswith("_scale") for stored in names)
        assert entry.bytes == stored_bytes(header, names), name
    # Dense tensors keep their source dtype.
    dense = [name for name, entry in manifest.tensors.items() if entry.kind == "dense"]
    assert dense and all(header[name][0] == "F32" for name in dense)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dtype_option_forces_the_storage(shop, dtype):
    artifact = shop.artifact("gpt2-rows", "--dtype", dtype)
    header = header_dtypes(artifact)
    for name, entry in factorized(artifact).items():
        assert entry.storage == dtype, name
        stored = [n for n in entry.stored_names(name) if not n.endswith(".row_index")]
        assert {header[n][0] for n in stored} == {SAFETENSORS_DTYPE[dtype]}, name


def test_quantize_int8_stores_int8_with_scales(shop):
    artifact = shop.artifact("gpt2-rows", "--quantize", "int8")
    header = header_dtypes(artifact)
    entries = factorized(artifact)
    assert "lowrank+rows" in {entry.kind for entry in entries.values()}
    for name, entry in entries.items():
        assert entry.storage == "int8", name
        assert header[name + ".lora_B"] == ("I8", [entry.shape[0], entry.rank])
        assert header[name + ".lora_A"] == ("I8", [entry.rank, entry.shape[1]])
        assert header[name + ".lora_scale"] == ("F32", [entry.rank])
        if entry.kind == "lowrank+rows":
            assert header[name + ".rows"] == ("I8", [entry.rows, entry.shape[1]])
            assert header[name + ".rows_scale"] == ("F32", [entry.rows])
            assert header[name + ".row_index"] == ("I64", [entry.rows])
        assert entry.bytes == stored_bytes(header, entry.stored_names(name)), name


@pytest.mark.parametrize("label", ["gpt2", "gpt2-rows"])
def test_int8_factor_bytes_are_well_under_bfloat16(shop, label):
    bf16 = factorized(shop.artifact(label, "--quantize", "none"))
    int8 = factorized(shop.artifact(label))
    assert set(bf16) == set(int8)
    assert [(bf16[n].kind, bf16[n].rank, bf16[n].rows) for n in bf16] == [(int8[n].kind, int8[n].rank, int8[n].rows)
                                                                          for n in bf16]
    bf16_bytes = sum(entry.bytes for entry in bf16.values())
    int8_bytes = sum(entry.bytes for entry in int8.values())
    assert int8_bytes < 0.6 * bf16_bytes, (int8_bytes, bf16_bytes)


def test_threshold_one_stores_the_source_dtype(shop):
    """Lossless: factors in float32 (the source dtype here), never bfloat16."""
    artifact = shop.artifact("gpt2-rows", "--threshold", "1.0")
    header = header_dtypes(artifact)
    entries = factorized(artifact)  # the planted embedding update has rank 13: low rank pays at 1.0
    for name, entry in entries.items():
        assert entry.storage == "float32", name
        assert {header[n][0] for n in entry.stored_names(name) if not n.endswith(".row_index")} == {"F32"}
        assert entry.error < 1e-5


def _float16_pair(root: Path) -> tuple[Path, Path, str]:
    """A float16 GPT-2 (init, trained) whose embedding update is an exact rank-2 matrix in float16
    (every value on a 2^-8 grid well inside float16's precision), so that low rank pays even at
    threshold 1; nothing else changes."""
    config = gpt2_config()
    model = build_model(config, seed=3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    name = "transformer.wte.weight"
    generator = torch.Generator().manual_seed(0)
    grid = 2.0**-8
    state[name] = torch.round(state[name] / grid) * grid
    init = {k: v.half().contiguous() for k, v in state.items()}
    left = torch.randint(-4, 5, (state[name].shape[0], 2), generator=generator).float() / 16
    right = torch.randint(-4, 5, (2, state[name].shape[1]), generator=generator).float() / 16
    trained = dict(init)
    trained[name] = (state[name] + left @ right).half()
    assert torch.equal(trained[name].float() - init[name].float(), left @ right)  # exact in float16
    folders = []
    for label, tensors in (("fp16-init", init), ("fp16-trained", trained)):
        folder = root / label
        folder.mkdir()
        config.save_pretrained(folder)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders[0], folders[1], name


def test_threshold_one_stores_a_float16_source_in_float32(tmp_path):
    """Lossless means exact: factors of a float16 update are not rounded to float16."""
    init, trained, name = _float16_pair(tmp_path)
    out = tmp_path / "out"
    run_cli("compress", trained, "--init", init, "-o", out, "--threshold", "1.0", "--quiet")
    entry = read_manifest(out).tensors[name]
    assert entry.has_factors and entry.storage == "float32"
    header = header_dtypes(out)
    assert header[name + ".lora_B"][0] == header[name + ".lora_A"][0] == "F32"
    default, floats = tmp_path / "default", tmp_path / "floats"
    run_cli("compress", trained, "--init", init, "-o", default, "--quiet")
    assert read_manifest(default).tensors[name].storage == "int8"
    run_cli("compress", trained, "--init", init, "-o", floats, "--quiet", "--quantize", "none")
    assert read_manifest(floats).tensors[name].storage == "bfloat16"


def test_rows_artifact_reconstructs_the_planted_rows(shop, tmp_path):
    """The decompressed embedding holds the planted rows' own updates, which plain low rank at the
    old rule (rank 1) would have lost."""
    pair = shop.pair("gpt2-rows")
    artifact = shop.artifact("gpt2-rows")
    dense = tmp_path / "dense"
    run_cli("decompress", artifact, "-o", dense, "--quiet")
    name = "transformer.wte.weight"
    rebuilt = load_file(dense / "model.safetensors")[name]
    update = pair.trained_state[name] - pair.init_state[name]
    error = relative_error(rebuilt - pair.init_state[name], update)
    entry = read_manifest(artifact).tensors[name]
    assert entry.kind == "lowrank+rows" and entry.rank == 1
    assert error == pytest.approx(entry.error, rel=1e-3)
    # Rank 1 alone (the drift) would leave the rows' own updates out: about 20% error.
    U, S, Vh = torch.linalg.svd(update.double(), full_matrices=False)
    rank_one = relative_error(S[0] * torch.outer(U[:, 0], Vh[0]), update)
    assert rank_one > 0.1 and error < 0.5 * rank_one



# --------------------------------------------------------------------------- int4


@pytest.mark.parametrize("length", [0, 1, 2, 9, 64, 129])
def test_nibbles_pack_and_unpack_exactly(length):
    codes = torch.randint(-7, 8, (3, length), generator=torch.Generator().manual_seed(length)).to(torch.int16)
    packed = pack_codes(codes, INT4)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (3, (length + 1) // 2)
    assert torch.equal(unpack_codes(packed, length, INT4), codes)
    if length >= 2:  # the lower index in the low nibble, stored as code + 8
        assert int(packed[0, 0]) == (int(codes[0, 0]) + 8) | ((int(codes[0, 1]) + 8) << 4)


@pytest.mark.parametrize("rank", [0, 1, 2, 3, 9])
def test_int4_factors_round_trip_within_half_a_step_per_group(rank):
    rows, cols = 131, 70  # neither a multiple of the group nor even
    B = gaussian(rows, rank, seed=rank) * torch.logspace(0, -3, rows)[:, None]  # groups of very different scales
    A = gaussian(rank, cols, seed=rank + 1)
    stored = stored_factors(B, A, "int4")
    layout = factors_layout("int4", rows, cols, rank)
    assert set(stored) == set(layout)
    for suffix, (shape, codes) in layout.items():
        assert tuple(stored[suffix].shape) == shape and SAFETENSORS_CODES[stored[suffix].dtype] in codes, suffix
    B_back, A_back = read_factors(stored, "int4")
    for j in range(rank):
        levels = INT8_LEVELS if j < INT4_LEAD else 7
        for vector, back in ((B[:, j], B_back[:, j]), (A[j], A_back[j])):
            for start in range(0, vector.numel(), GROUP_SIZE):
                group, got = vector[start:start + GROUP_SIZE], back[start:start + GROUP_SIZE]
                step = float(group.abs().max()) / levels
                # Half a step, the step rounded up to bfloat16 (at most 2^-7 relative) to hold the absmax.
                assert float((got - group).abs().max()) <= 0.5 * step * (1 + 2 ** -7) + 1e-12, (j, start)
    if rank > INT4_LEAD:  # the leading components are finer than the others
        assert relative_error(B_back[:, 0], B[:, 0]) < relative_error(B_back[:, -1], B[:, -1]) / 4


def test_int4_rows_round_trip_and_zero_groups_stay_zero():
    rows = gaussian(5, 130, seed=3)
    rows[1] = 0.0
    rows[2, 64:128] = 0.0
    stored = stored_rows(rows, "int4")
    assert {suffix: tuple(t.shape) for suffix, t in stored.items()} == {".rows": (5, 65), ".rows_scale": (5, 3)}
    back = read_rows(stored, "int4", 130)
    assert torch.isfinite(back).all() and back[1].eq(0).all() and back[2, 64:128].eq(0).all()
    assert relative_error(back, rows) < 0.15
    assert [t.tolist() for t in round_trip(gaussian(9, 3, seed=1), gaussian(3, 7, seed=2), rows, "int4")[2:]] == \
        [back.tolist()]


@pytest.mark.parametrize(("storage", "bands"), [("int8", None), ("int4", None), ("mixed", ((8, 1), (4, 2), (3, 2), (2, 2)))])
def test_scales_alone_rebuild_what_a_reader_decodes(storage, bands):
    """The levels with every scale 1, times the stored scales (what --distill-scales trains), are what
    ``read_update`` decodes; other scales change the update, and their gradient reaches every scale."""
    B, A, rows = gaussian(150, 7, seed=1), gaussian(7, 90, seed=2), gaussian(5, 90, seed=3)
    stored = stored_update(B, A, rows, storage, bands=bands)
    scales = {suffix: tensor.float() for suffix, tensor in stored.items() if suffix in SCALE_SUFFIXES}
    assert set(scales) == ({".lora_scale", ".rows_scale"} if storage == "int8"
                           else {".lora_B_scale", ".lora_A_scale", ".rows_scale"})
    read_B, read_A, read_rows_back = read_update(stored, storage, 90)
    levels = unscaled_update(stored, storage, 90)
    scaled_B, scaled_A, scaled_rows = scaled_update(*levels, scales, storage)
    assert torch.allclose(scaled_B @ scaled_A, read_B @ read_A, rtol=0, atol=1e-5)
    assert torch.equal(scaled_rows, read_rows_back)
    trained = {suffix: (scale * 1.1).requires_grad_() for suffix, scale in scales.items()}
    moved_B, moved_A, moved_rows = scaled_update(*levels, trained, storage)
    assert not torch.allclose(moved_B @ moved_A, read_B @ read_A, atol=1e-3)
    ((moved_B @ moved_A).square().sum() + moved_rows.square().sum()).backward()
    assert all(scale.grad is not None and scale.grad.abs().sum() > 0 for scale in trained.values())


def test_float_storage_has_no_scales_to_train():
    with pytest.raises(ValueError, match="no scales"):
        unscaled_update(stored_update(gaussian(9, 3, seed=1), gaussian(3, 7, seed=2), None, "bfloat16"), "bfloat16", 7)


@pytest.mark.parametrize("rank", [0, 1, 2, 5])
def test_int4_costs_count_the_stored_bytes(rank):
    rows, cols, count = 131, 70, 4
    costs = Costs(**storage_costs("int4"), dense=rows * cols * 4)
    factors = stored_factors(gaussian(rows, rank, seed=0), gaussian(rank, cols, seed=1), "int4")
    assert costs.lowrank(rank, rows, cols) == sum(t.numel() * t.element_size() for t in factors.values())
    stored = stored_rows(gaussian(count, cols, seed=2), "int4")
    assert costs.row_set(count, cols) == sum(t.numel() * t.element_size() for t in stored.values()) + 8 * count
    breakeven = costs.breakeven_rank(rows, cols)
    assert costs.lowrank(breakeven, rows, cols) < costs.dense <= costs.lowrank(breakeven + 1, rows, cols)


def test_quantize_int4_stores_its_layout_and_counts_its_bytes(shop):
    artifact = shop.artifact("gpt2-rows", "--quantize", "int4")
    header = header_dtypes(artifact)
    entries = factorized(artifact)
    assert read_manifest(artifact).version == FORMAT_VERSION
    assert "lowrank+rows" in {entry.kind for entry in entries.values()}
    for name, entry in entries.items():
        assert entry.storage == "int4", name
        lead = min(2, entry.rank)
        assert header[name + ".lora_B"] == ("I8", [entry.shape[0], lead])
        assert header[name + ".lora_A_int4"] == ("U8", [entry.rank - lead, -(-entry.shape[1] // 2)])
        assert header[name + ".lora_B_scale"] == ("BF16", [-(-entry.shape[0] // 64), entry.rank])
        if entry.kind == "lowrank+rows":
            assert header[name + ".rows"] == ("U8", [entry.rows, -(-entry.shape[1] // 2)])
        assert entry.bytes == stored_bytes(header, entry.stored_names(name)), name
    described = {layer["name"]: layer for layer in describe_artifact(artifact)["layers"]}
    for name, entry in entries.items():  # inspect shows the bands
        assert described[name]["bands"] == [b for b in ({"components": min(2, entry.rank), "bits": 8},
                                                        {"components": entry.rank - min(2, entry.rank), "bits": 4})
                                            if b["components"]], name
    assert all(layer["bands"] is None for layer in described.values() if layer["kind"] == "dense")
    # The same forms as int8's, in fewer bytes (on these 32-wide tensors the two 8-bit components and
    # the group scales are a large share; on the README's run int4 is 56% of int8's bytes).
    int8 = factorized(shop.artifact("gpt2-rows"))
    assert [(e.kind, e.rank, e.rows) for e in entries.values()] == [(e.kind, e.rank, e.rows) for e in int8.values()]
    assert sum(entry.bytes for entry in entries.values()) < 0.8 * sum(entry.bytes for entry in int8.values())


@pytest.mark.parametrize("conv1d", [False, True])
def test_int4_error_feedback_lowers_the_output_error_on_a_non_isotropic_gram(conv1d):
    generator = torch.Generator().manual_seed(7)
    mixing = torch.linalg.qr(torch.randn(96, 96, generator=generator))[0]
    inputs = torch.randn(4000, 96, generator=generator) @ torch.diag(torch.logspace(0, -2, 96)) @ mixing  # [tokens, in]
    gram = (inputs.T @ inputs).double()
    B, A = gaussian(40, 6, seed=1), gaussian(6, 96, seed=2)  # nn.Linear [out, in]: A meets the input
    if conv1d:  # GPT-2's Conv1D stores the weight [in, out]: B meets the input
        B, A = A.T.contiguous(), B.T.contiguous()

    def output_error(stored: dict) -> float:
        B_back, A_back = read_factors(stored, "int4")
        error = B @ A - B_back @ A_back
        return float((inputs @ error if conv1d else inputs @ error.T).norm())

    plain = stored_factors(B, A, "int4")
    fed = stored_factors(B, A, "int4", InputGram(gram, conv1d))
    assert {k: (v.shape, v.dtype) for k, v in fed.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}
    assert output_error(fed) < 0.8 * output_error(plain), (output_error(fed), output_error(plain))
    # Only the factor that meets the input changes.
    untouched = ".lora_A_int4" if conv1d else ".lora_B_int4"
    assert torch.equal(fed[untouched], plain[untouched])


@pytest.mark.parametrize("label", ["gpt2-rows", "llama-rows"])
def test_quantize_mixed_stores_the_budgets_bands_and_counts_their_bytes(shop, label):
    artifact = shop.artifact(label, *MIXED)
    manifest = read_manifest(artifact)
    header = header_dtypes(artifact)
    entries = factorized(artifact)
    assert manifest.version == FORMAT_VERSION == 4 and manifest.rule.criterion == "budget"
    widths = set()
    for name, entry in entries.items():
        assert entry.storage == "mixed" and entry.bands is not None, name
        assert sum(count for _, count in entry.bands) == entry.rank, name
        widths |= {bits for bits, _ in entry.bands}
        for bits, count in entry.bands:
            if bits < 8:
                suffix = {4: "_int4", 3: "_int3", 2: "_int2"}[bits]
                assert header[name + ".lora_A" + suffix] == ("U8", [count, -(-entry.shape[1] * bits // 8)]), name
        assert entry.bytes == stored_bytes(header, entry.stored_names(name)), name
    assert len(widths) >= 2, widths  # the budget chose more than one width
    total = (artifact / "inrank.safetensors").stat().st_size
    assert total <= 0.3 * manifest.original_bytes
    described = {layer["name"]: layer for layer in describe_artifact(artifact)["layers"]}
    for name, entry in entries.items():  # inspect shows the bands as stored
        assert described[name]["bands"] == [{"components": count, "bits": bits} for bits, count in entry.bands]
    # Bands that do not hold the rank are a damaged manifest, refused by name.
    name, entry = next((name, entry) for name, entry in entries.items() if entry.rank)
    broken = TensorEntry(**{**entry.__dict__, "bands": ((8, entry.rank + 1),)})
    with pytest.raises(ManifestFormatError, match="bands"):
        broken.check(name, manifest.tensors)
    unbanded = TensorEntry(**{**entry.__dict__, "bands": None})
    with pytest.raises(ManifestFormatError, match="bands go with mixed storage"):
        unbanded.check(name, manifest.tensors)
