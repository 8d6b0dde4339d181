"""The package installs beside the torch a user already has: it asks for ranges, and pip's
resolver, in this venv that already holds torch, plans no torch action."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


def test_no_dependency_is_pinned_exactly():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_requirement = [d for d in dependencies if d.replace(" ", "").startswith("torch")]
    assert torch_requirement == ["torch>=2.4"]
    assert not [d for d in dependencies if "==" in d], dependencies
    # The exact pin lives where this project installs itself.
    assert "torch==" in (REPO / "constraints.txt").read_text()
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()


def test_installing_the_package_leaves_the_installed_torch_alone(tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--no-index",
                           "--quiet", "--report", str(report), str(REPO)], capture_output=True, text=True, timeout=300)
    # Offline (--no-index): a requirement the installed torch does not meet fails to resolve here.
    assert done.returncode == 0, done.stderr[-2000:]
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "inrank-convert" in planned
    assert "torch" not in planned, f"pip would replace torch {torch.__version__} with {planned.get('torch')}"
