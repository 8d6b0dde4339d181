"""The import layers of DESIGN §7 (pyproject.toml [tool.importlinter]) hold: `make test` enforces them too."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("importlinter") is None or not LINT_IMPORTS.is_file(),
    reason="import-linter is not installed in this environment (pip install -e '.[dev]')",
)


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    # --no-cache: nothing is written into the repository.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_the_import_layers_hold():
    done = lint_imports()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout, done.stdout[-2000:]


def test_a_reversed_layer_is_reported(tmp_path):
    """The check can fail: with errors placed above checkpoints (which imports it), the contract breaks."""
    config = tmp_path / "reversed.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "inrank_convert"\n\n'
        '[[tool.importlinter.contracts]]\nname = "reversed"\ntype = "layers"\n'
        'containers = ["inrank_convert"]\nlayers = ["errors", "checkpoints"]\n')
    done = lint_imports(str(config))
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and "inrank_convert.checkpoints -> inrank_convert.errors" in done.stdout, \
        done.stdout[-2000:]
