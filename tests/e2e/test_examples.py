"""The example scripts in examples/ run end to end with tiny settings (real data, real CLI).

Every command of a script is a fresh process that imports torch and transformers (~5 CPU-seconds
each, whatever the model size), so the scripts cost minutes of CPU even this tiny. To keep the wall
time down, the selected CPU scripts all start together when the first of their tests runs, and
each test then waits for its own. from_scratch.sh starts in a folder holding an earlier run's
leftovers (the re-run check).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inrank_convert.artifact import FORMAT_VERSION
from tests.conftest import REPO, SHARED_DATA

EXAMPLES = REPO / "examples"
SCRIPTS = ("from_scratch.sh", "finetune_delta.sh", "gpu.sh", "distributed.sh")
IC = Path(sys.executable).parent / "inrank-convert"
TIMEOUT = 600  # seconds per script run: a generous bound on a busy 2-core machine

HAS_DATA = all((SHARED_DATA / name).is_file() for name in (
    "gpt2-tokenizer/vocab.json", "gpt2-tokenizer/merges.txt", "tinyshakespeare/input.txt",
    "wikitext-2-raw/wiki.valid.raw", "wikitext-2-raw/wiki.test.raw"))
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"needs the shared data in {SHARED_DATA}")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# A 1x32 GPT-2 with a 16-token context, a few steps of everything, 64 tokens of report.
TINY = dict(N_EMBD="32", N_LAYER="1", N_HEAD="2", BLOCK="16", BATCH="4", STEPS="4", LR="3e-3",
            RESUME_STEPS="2", FT_STEPS="2", MORE="2", RANK_WARMUP="1", RANK_EVERY="1", MAX_TOKENS="64", NPROC="2")


def script_env(out: Path, **overrides) -> dict[str, str]:
    # INRANK_CONVERT_CACHE comes from os.environ (conftest sets one per test session).
    return {**os.environ, **TINY, "OUT": str(out), "DATA": str(SHARED_DATA), "IC": str(IC),
            "PYTHONUNBUFFERED": "1", **overrides}


class Launched:
    """A script started in the background; ``wait()`` returns its exit code and combined output."""

    def __init__(self, script: str, out: Path, log: Path | None = None, **overrides):
        self.out = out
        self.log = log or out.with_name(out.name + ".log")
        with open(self.log, "w") as handle:
            self.process = subprocess.Popen(["bash", str(EXAMPLES / script)], cwd=REPO, env=script_env(out, **overrides),
                                            stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait(self) -> tuple[int, str]:
        code = self.process.wait(timeout=TIMEOUT)
        return code, self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def run_script(script: str, out: Path, **overrides) -> tuple[int, str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Launched(script, out, **overrides).wait()


def listing(folder: Path) -> dict[str, int]:
    """Size of every file below ``folder``, by relative path."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def plant_leftovers(out: Path) -> None:
    """What an earlier run (and the user) left in OUT: the script must replace its own, keep the rest."""
    (out / "run" / "step-99").mkdir(parents=True)  # must not be taken for the run's latest step
    (out / "run" / "step-99" / "stale.txt").write_text("from an earlier run\n")
    (out / "t0.99").mkdir()
    (out / "t0.99" / "stale.txt").write_text("from an earlier run\n")
    (out / "keep.txt").write_text("not the script's\n")


def warm_token_cache() -> None:
    """Tokenize the two training texts once, into the cache the scripts' train commands read."""
    from inrank_convert.inputs.text import cached_tokens, load_tokenizer

    tokenizer = load_tokenizer(None, SHARED_DATA / "gpt2-tokenizer")
    for text in ("tinyshakespeare/input.txt", "wikitext-2-raw/wiki.valid.raw"):
        cached_tokens(SHARED_DATA / text, tokenizer, os.environ["INRANK_CONVERT_CACHE"])


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    """The selected CPU scripts, all started at once (a script whose tests are not selected is not run)."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    warm_token_cache()
    base = tmp_path_factory.mktemp("examples")
    started = {}
    if "test_from_scratch_replaces_its_own_leftovers" in selected:
        plant_leftovers(base / "from_scratch")
        started["from_scratch.sh"] = Launched("from_scratch.sh", base / "from_scratch")
    for script in ("finetune_delta.sh", "distributed.sh"):
        if f"test_{script.removesuffix('.sh')}" in selected:
            started[script] = Launched(script, base / script.removesuffix(".sh"))
    yield started
    for run in started.values():
        run.stop()


def finished(launched: dict[str, Launched], script: str) -> tuple[Path, str]:
    code, output = launched[script].wait()
    assert code == 0, f"{script} exited with {code}:\n{output[-6000:]}"
    assert "Traceback" not in output, output[-6000:]
    return launched[script].out, output


def is_artifact(folder: Path) -> bool:
    return (folder / "inrank.safetensors").is_file() and (folder / "config.json").is_file()


def check_from_scratch(out: Path, code: int, output: str, files: dict[str, int]) -> None:
    assert code == 0, f"from_scratch.sh exited with {code}:\n{output[-6000:]}"
    assert "Traceback" not in output, output[-6000:]
    for name in ("config/config.json", "run/step-0/inrank_init.json", "run/step-4/model.safetensors",
                 "t0.9/inrank.safetensors", "t0.99/inrank.safetensors", "inrank/metrics.jsonl",
                 "inrank/step-2/inrank.safetensors", "inrank/step-2/config.json"):  # the resumed run's last step
        assert name in files, (name, sorted(files))
    assert files.get("report.png", 0) > 0 and files.get("report-inrank.png", 0) > 0
    assert output.count("Perplexity on") == 2  # two reports
    assert f"{out}/inrank/step-2 (format v{FORMAT_VERSION})" in output  # inspect


@needs_bash
@needs_data
def test_from_scratch_replaces_its_own_leftovers(launched):
    out, output = finished(launched, "from_scratch.sh")
    files = listing(out)
    check_from_scratch(out, 0, output, files)
    assert "run/step-99/stale.txt" not in files and "t0.99/stale.txt" not in files
    assert "keep.txt" in files  # only the script's own outputs are replaced


@needs_bash
@needs_data
def test_finetune_delta(launched):
    out, output = finished(launched, "finetune_delta.sh")
    assert (out / "base" / "step-4" / "model.safetensors").is_file()
    assert (out / "finetune" / "step-2" / "model.safetensors").is_file()
    assert is_artifact(out / "delta")
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "Perplexity on" in output  # report
    found = dict(re.findall(r"^\s*(base|fine-tune|artifact|adapter)\s+perplexity\s+([0-9.]+)\s*$", output, re.M))
    assert set(found) == {"base", "fine-tune", "artifact", "adapter"}, output[-3000:]
    artifact, adapter = float(found["artifact"]), float(found["adapter"])
    assert adapter == pytest.approx(artifact, rel=0.01)  # base + adapter is the artifact's model


@needs_bash
@needs_data
def test_distributed(launched):
    out, output = finished(launched, "distributed.sh")
    run = out / "run"
    for step in (0, 4, 6):  # trained to 4, continued in place to 4 + MORE
        assert (run / f"step-{step}").is_dir()
    assert is_artifact(run / "step-6")
    assert (run / "step-6" / "train_state" / "trainer_state.json").is_file()
    assert '"step": 6' in (run / "metrics.jsonl").read_text()
    assert f"{run}/step-6 (format v{FORMAT_VERSION})" in output  # inspect


@needs_bash
@needs_data
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu(tmp_path):
    out = tmp_path / "gpu"
    code, output = run_script("gpu.sh", out)
    check_from_scratch(out, code, output, listing(out))


@needs_bash
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_script_stops_at_once_without_cuda(tmp_path):
    out = tmp_path / "gpu"
    code, output = run_script("gpu.sh", out)
    assert code == 1
    assert output.strip().startswith("error:") and "CUDA" in output and len(output.strip().splitlines()) == 1
    assert not out.exists()  # nothing written


@needs_bash
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_is_executable(script):
    path = EXAMPLES / script
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(path, os.X_OK)
    assert "set -euo pipefail" in path.read_text()
