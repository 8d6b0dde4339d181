"""compression/torchrun.py: compress under torchrun (gloo, CPU): the tensors shared out over the
processes, rank 0 writes the one artifact, byte for byte a single process's; idle ranks; errors and
a killed process.

Each torchrun test starts real processes (python -m torch.distributed.run --standalone, one
BLAS thread each); the single-process reference runs here with one thread too, because the
number of threads changes an SVD's last bits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inrank_convert.artifact import ARTIFACT_FILE, INIT_FILE, read_manifest
from inrank_convert.compression.execution import HintChains
from inrank_convert.compression.job import CompressionJob, compress, plan_compression
from inrank_convert.compression.plan import PlanOptions
from inrank_convert.compression.torchrun import _compute
from inrank_convert.compression.torchrun_schedule import hashing_cost, share_out
from inrank_convert.compression.updates import planned_entries
from inrank_convert.inputs.sources import open_inputs
from inrank_convert.linalg.criteria import RankRule
from tests.conftest import REPO, make_pair
from tests.helpers.cli_contract import temps_beside

TIMING_FIELDS = ("created",)  # the manifest's only field that depends on when it was written


def torchrun(processes: int, args: list, timeout: float = 180, wait: bool = True):
    """``torchrun --standalone --nproc_per_node N -m inrank_convert compress ARGS``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "inrank_convert", "compress", *[str(arg) for arg in args]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@contextmanager
def one_thread():
    """What torchrun gives each process (OMP_NUM_THREADS=1), for the single-process reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_artifact_file(folder: Path) -> tuple[dict, dict, bytes]:
    """(tensor header, manifest, data bytes) of an artifact's tensor file."""
    with open(folder / ARTIFACT_FILE, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        data = handle.read()
    manifest = json.loads(header.pop("__metadata__")["inrank"])
    return header, manifest, data


def assert_same_artifact(ours: Path, single: Path) -> None:
    """Same tensors (names, order, dtypes, shapes, offsets, bytes) and the same manifest apart from its timing fields."""
    header, manifest, data = read_artifact_file(ours)
    single_header, single_manifest, single_data = read_artifact_file(single)
    assert list(header.items()) == list(single_header.items())
    assert data == single_data
    for field in TIMING_FIELDS:
        assert field in manifest
        manifest.pop(field), single_manifest.pop(field)
    assert manifest == single_manifest
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in single.iterdir())
    if (single / INIT_FILE).exists():
        assert (ours / INIT_FILE).read_bytes() == (single / INIT_FILE).read_bytes()


def our_error_lines(stderr: str) -> list[str]:
    """The lines inrank-convert's processes printed as errors (torchrun's own report aside)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def owners_by_name(trained: Path, init: Path | None, options: PlanOptions, processes: int) -> dict[str, int]:
    inputs = open_inputs(trained, init, no_init=init is None)
    try:
        work = planned_entries(plan_compression(inputs, options))
        owners = share_out(work, processes, hashing_cost(inputs, options.device))
    finally:
        inputs.close()
    return {entry.name: owners[index] for index, entry in work if entry.action == "factorize"}


def test_two_gloo_processes_write_the_single_process_artifact(tmp_path):
    # Every stored form: lowrank (the randomized SVD: each tensor's seed matters), dense (a
    # full-rank update, where low rank does not pay), zero (an unchanged tensor), a tensor
    # excluded (copied whole by rank 0), and the embedded init.
    pair = make_pair(tmp_path, unchanged=("transformer.h.1.attn.c_proj.weight",))
    state = load_file(pair.trained_dir / "model.safetensors")
    noisy = "transformer.h.0.attn.c_proj.weight"  # [64, 64]
    state[noisy] = pair.init_state[noisy] + 0.3 * torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    save_file(state, pair.trained_dir / "model.safetensors", metadata={"format": "pt"})
    # float32 factors: in bfloat16 a 64x64 tensor's factors would be smaller than it up to full rank.
    options = PlanOptions(rule=RankRule("energy-rest", 0.99), engine="randomized", seed=3, factor_dtype=torch.float32,
                          exclude=("*h.0.mlp.c_proj*",))
    flags = ["--threshold", "0.99", "--svd", "randomized", "--seed", "3", "--dtype", "float32", "--embed-init",
             "--exclude", "*h.0.mlp.c_proj*"]
    done = torchrun(2, [pair.trained_dir, "--init", pair.init_dir, "-o", tmp_path / "two", "--quiet", "--json", *flags])
    assert done.returncode == 0, done.stderr[-3000:]
    assert not our_error_lines(done.stderr)
    summary = json.loads(done.stdout)  # rank 0 alone prints: one JSON object
    with one_thread():
        single = compress(pair.trained_dir, tmp_path / "single", init=pair.init_dir, embed_init=True, options=options)
    assert_same_artifact(tmp_path / "two", tmp_path / "single")
    entries = read_manifest(tmp_path / "two").tensors
    assert {"lowrank", "dense", "zero"} <= {entry.kind for entry in entries.values()}
    assert entries[noisy].kind == "dense"
    assert [layer["name"] for layer in summary["layers"]] == [layer.name for layer in single.layers]
    assert summary["compressed_bytes"] == single.compressed_bytes
    # Both processes computed: the plan gave each of them some of the factorized tensors.
    assert set(owners_by_name(pair.trained_dir, pair.init_dir, options, 2).values()) == {0, 1}
    assert not temps_beside(tmp_path / "two")


def test_more_processes_than_tensors_leaves_ranks_idle_and_the_artifact_the_same(tmp_path):
    pair = make_pair(tmp_path)
    flags = ["--include", "*wpe*"]  # one tensor to factorize, three processes
    options = PlanOptions(include=("*wpe*",))
    assert len(owners_by_name(pair.trained_dir, pair.init_dir, options, 3)) == 1  # two processes have nothing to do
    done = torchrun(3, [pair.trained_dir, "--init", pair.init_dir, "-o", tmp_path / "three", "--quiet", *flags])
    assert done.returncode == 0, done.stderr[-3000:]
    with one_thread():
        compress(pair.trained_dir, tmp_path / "single", init=pair.init_dir, options=options)
    assert_same_artifact(tmp_path / "three", tmp_path / "single")


def test_an_error_in_another_process_is_one_line_from_rank_0_and_nothing_is_written(tmp_path):
    pair = make_pair(tmp_path)
    owners = owners_by_name(pair.trained_dir, pair.init_dir, PlanOptions(), 2)
    name = sorted(name for name, rank in owners.items() if rank == 1)[0]
    broken = tmp_path / "broken"
    shutil.copytree(pair.trained_dir, broken)
    state = load_file(broken / "model.safetensors")
    state[name][1, 2] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    output = tmp_path / "out"
    done = torchrun(2, [broken, "--init", pair.init_dir, "-o", output])
    assert done.returncode != 0
    lines = our_error_lines(done.stderr)
    assert len(lines) == 1, done.stderr[-3000:]
    assert name in lines[0] and "NaN" in lines[0]
    assert "inrank_convert/" not in done.stderr  # no traceback from any of our processes
    assert not output.exists() and not temps_beside(output)


def test_an_error_only_another_process_meets_before_compress_starts_is_printed_by_rank_0(tmp_path):
    # The CLI's own checks fail on rank 1 alone (as a path that only one node lacks would): rank 1
    # joins the job to hand its error to rank 0, which prints it.
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os\n"
        "import inrank_convert.cli.compress as compress_cli\n"
        "from inrank_convert.cli import main\n"
        "from inrank_convert.core.errors import UsageError\n"
        "checks = compress_cli._compress_threshold\n"
        "def rank_1_fails(*args):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise UsageError('only rank 1 meets this', 'rank 1', 'nothing to fix')\n"
        "    return checks(*args)\n"
        "compress_cli._compress_threshold = rank_1_fails\n"
        "main()\n")
    pair = make_pair(tmp_path)
    output = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(launcher), "compress", str(pair.trained_dir), "--init", str(pair.init_dir), "-o",
                           str(output)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert our_error_lines(done.stderr) == ["error: only rank 1 meets this: rank 1 (nothing to fix)"], done.stderr[-3000:]
    assert not output.exists() and not temps_beside(output)


def test_a_process_killed_mid_run_leaves_no_artifact(tmp_path):
    if not Path("/proc/self/environ").exists():
        pytest.skip("finding the worker process needs /proc")
    # Twelve 768x768 exact float64 SVDs: about 2 s per process, so the kill lands mid-run.
    generator = torch.Generator().manual_seed(0)
    weights = tmp_path / "weights.safetensors"
    save_file({f"layers.{i}.weight": torch.randn(768, 768, generator=generator) for i in range(12)}, weights)
    output = tmp_path / "out"
    job = torchrun(2, [weights, "--no-init", "-o", output, "--svd", "exact", "--float64", "--quiet"], wait=False)
    try:
        deadline = time.monotonic() + 120
        # Rank 0 makes its temporary folder once every process has agreed on the plan: from then on both compute.
        while not temps_beside(output) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert temps_beside(output), "rank 0 never started writing"
        os.kill(_worker_pid(job.pid, rank=1), signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert not output.exists()  # no artifact, not even a folder that could pass for one
    assert not temps_beside(output)  # rank 0 removed its temporary folder
    lines = our_error_lines(stderr)
    assert len(lines) == 1 and "nothing was written" in lines[0], stderr[-3000:]


def _worker_pid(launcher: int, rank: int) -> int:
    """The process torchrun started for ``rank`` (its child, with RANK=rank in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environment:
            return int(entry.name)
    raise AssertionError(f"no process for rank {rank} under {launcher}")


def test_tensors_computed_in_any_order_and_written_by_another_writer_give_the_same_file(tmp_path):
    """What each process does, in one process: every tensor computed into a RecordingWriter, here
    the hint chains last to first (a tensor's seed is its plan index, not its turn; the adaptive
    engine's basis hints pass only along a chain, in plan order), then written in plan order."""
    pair = make_pair(tmp_path, unchanged=("transformer.h.1.attn.c_proj.weight",))
    options = PlanOptions(engine="randomized", seed=3, exclude=("*h.0.mlp.c_proj*",))

    class Recorded(CompressionJob):
        def execute(self, writer, budget):
            work = planned_entries(self.plan)
            chains = HintChains(work)
            groups: dict[object, list] = {}  # a chain's tensors together, in plan order; others alone
            for index, entry in work:
                groups.setdefault(chains.chain.get(index, ("alone", index)), []).append((index, entry))
            order = [item for group in reversed(list(groups.values())) for item in group]
            assert order != work and len(groups) > 1
            computed = {index: _compute(entry, index, self.inputs, self.options, torch.device("cpu"), chains)
                        for index, entry in order}
            for index, _ in work:
                layer, stored = computed[index]
                for item in stored:
                    layer.entry = writer.add_stored(item, self.inputs.trained.get, self.inputs.reference.get)
                yield layer

    compress(pair.trained_dir, tmp_path / "direct", init=pair.init_dir, embed_init=True, options=options)
    with Recorded(pair.trained_dir, init=pair.init_dir, embed_init=True, options=options) as job:
        recorded = job.write(tmp_path / "recorded")
    assert_same_artifact(tmp_path / "recorded", tmp_path / "direct")
    kinds = {layer.kind for layer in recorded.layers}
    assert {"lowrank", "dense", "zero"} <= kinds
