"""The table of ``--json`` keys in docs/json.md against what every command really prints.

Each command runs through the real CLI on a tiny GPT-2 pair with a real BPE tokenizer (trained on a
short text, ids inside the model's 320-token vocabulary), so the table cannot drift from the code.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO, RIVER_TEXT, make_pair
from tests.helpers.cli_contract import expect_ok

JSON_DOCS = REPO / "docs" / "json.md"

# export-peft is one of the commands: without peft there is nothing to check it against.
pytest.importorskip("peft")


def documented() -> dict[str, tuple[set[str], set[str]]]:
    """command -> (keys every run prints, keys only some runs print), from the table under "Top-level
    keys per command": the backticked words of the keys cell, leaving out nested key lists in parentheses;
    those inside "(+ ...)" notes are the optional ones."""
    section = JSON_DOCS.read_text(encoding="utf-8").split("## Top-level keys per command", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[set[str], set[str]]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        notes = re.findall(r"\(\+[^()]*\)", cells[1])
        always = re.sub(r"\([^()]*(\([^()]*\)[^()]*)*\)", "", cells[1])
        extra = {key for note in notes for key in re.findall(r"`([a-z_]+)`", note)}
        for command in re.findall(r"`([^`]+)`", cells[0]):
            table[command] = (set(re.findall(r"`([a-z_]+)`", always)), extra)
    return table


@pytest.fixture(scope="module")
def printed(tmp_path_factory, tokenizer_file) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("json-docs")
    pair = make_pair(root)
    (pair.trained_dir / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    text = root / "text.txt"
    text.write_text(RIVER_TEXT)
    artifact = root / "artifact"

    def run(*args) -> dict:
        return json.loads(expect_ok([*args, "--json"]).stdout)

    out = {
        "compress": run("compress", pair.trained_dir, "--init", pair.init_dir, "-o", artifact),
        "compress --dry-run": run("compress", pair.trained_dir, "--init", pair.init_dir, "--dry-run"),
        "inspect": run("inspect", artifact),
        "spectrum": run("spectrum", pair.trained_dir, "--init", pair.init_dir),
        "verify": run("verify", artifact),
        "decompress": run("decompress", artifact, "-o", root / "dense"),
        "export-peft": run("export-peft", artifact, "-o", root / "adapter"),
        "report": run("report", artifact, "--data", text, "--context", 32, "--max-tokens", 256, "--quiet"),
        "generate": run("generate", artifact, "--prompt", "the river", "--max-new-tokens", 4),
    }
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    out["train"] = run("train", pair.trained_dir / "config.json", "-o", root / "run", "--data", text, "--tokenizer",
                       tokenizer, "--steps", 2, "--block-size", 16, "--batch-size", 2, "--quiet")
    out["resume"] = run("resume", root / "run", "--steps", 3, "--quiet")
    return out


def test_every_command_prints_the_documented_keys(printed):
    table = documented()
    assert set(printed) <= set(table), f"commands missing from the docs/json.md table: {set(printed) - set(table)}"
    for command, payload in printed.items():
        keys, extra = table[command]
        assert keys, command
        assert keys <= set(payload), f"{command}: documented but not printed: {keys - set(payload)}"
        assert set(payload) <= keys | extra, f"{command}: printed but not documented: {set(payload) - keys - extra}"
