"""The import layers of docs/design.md §2 (pyproject.toml [tool.importlinter]) hold, between packages
and between the modules of each package: `make test` enforces them too."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "inrank_convert"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("importlinter") is None or not LINT_IMPORTS.is_file(),
    reason="import-linter is not installed in this environment (pip install -e '.[dev]')",
)


def contracts() -> list[dict]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    # --no-cache: nothing is written into the repository.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_the_import_layers_hold():
    done = lint_imports()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"{len(contracts())} kept, 0 broken" in done.stdout, done.stdout[-2000:]


def test_every_package_has_its_module_contract_beside_the_package_one():
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages, PACKAGE
    containers = [contract["containers"] for contract in contracts()]
    assert ["inrank_convert"] in containers  # the layers between packages
    assert sorted(c[0].removeprefix("inrank_convert.") for c in containers if c != ["inrank_convert"]) == packages
    assert all(contract.get("exhaustive") for contract in contracts())


def test_a_reversed_layer_is_reported(tmp_path):
    """The check can fail: with core placed above weights (which imports it), the contract breaks."""
    config = tmp_path / "reversed.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "inrank_convert"\n\n'
        '[[tool.importlinter.contracts]]\nname = "reversed"\ntype = "layers"\n'
        'containers = ["inrank_convert"]\nlayers = ["core", "weights"]\n')
    done = lint_imports(str(config))
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and "inrank_convert.weights.checkpoints -> inrank_convert.core.errors" in done.stdout, \
        done.stdout[-2000:]
