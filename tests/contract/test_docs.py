"""The README and docs/ against the repository and the CLI: every relative link resolves (to a file,
and to a heading of that page when it names an anchor), and every ``inrank-convert COMMAND`` written
in a code block or code span names a command the Typer app has. No mkdocs needed; no subprocess."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import typer

ROOT = next(folder for folder in Path(__file__).resolve().parents if (folder / "pyproject.toml").is_file())

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
COMMAND = re.compile(r"(?:\binrank-convert|-m[ \t]+inrank_convert)[ \t]+([a-z][a-z0-9_-]*)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def command_names() -> set[str]:
    try:
        from inrank_convert.cli import app
    except ImportError:  # the Typer app in its own module of the cli package
        from inrank_convert.cli.app import app
    return set(typer.main.get_command(app).commands)


def slug(heading: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading: its text without markup, lowercase,
    characters other than word characters, spaces and hyphens dropped, runs of spaces and hyphens
    turned into one hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def prose(text: str) -> str:
    """The text outside code blocks and code spans (where a link is a link)."""
    return SPAN.sub("", FENCE.sub("", text))


def code(text: str) -> list[str]:
    """Every code block and code span of a page."""
    blocks = [match.group(0) for match in FENCE.finditer(text)]
    return blocks + [match.group(2) for match in SPAN.finditer(FENCE.sub("", text))]


def anchors(page: Path) -> set[str]:
    return {slug(match.group(1)) for match in HEADING.finditer(FENCE.sub("", page.read_text(encoding="utf-8")))}


def link_problems(files: list[Path]) -> list[str]:
    problems = []
    for page in files:
        for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
            if EXTERNAL.match(target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                problems.append(f"{page.name}: link to a missing file: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{page.name}: link to a missing heading: {target}")
    return problems


def command_problems(files: list[Path], names: set[str]) -> list[str]:
    problems = []
    for page in files:
        for snippet in code(page.read_text(encoding="utf-8")):
            for name in COMMAND.findall(snippet):
                if name not in names:
                    problems.append(f"{page.name}: unknown command: inrank-convert {name}")
    return problems


def test_every_link_of_the_readme_and_the_docs_resolves():
    files = pages()
    assert len(files) > 10 and all(page.is_file() for page in files), files
    assert link_problems(files) == []


def test_every_command_written_in_the_readme_and_the_docs_exists():
    names = command_names()
    assert {"compress", "decompress", "train", "resume"} <= names, names
    files = pages()
    assert sum(len(COMMAND.findall(snippet)) for page in files for snippet in code(page.read_text())) > 50
    assert command_problems(files, names) == []


def test_the_checker_reports_broken_links_anchors_and_unknown_commands(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A `code` heading: here\n")
    (tmp_path / "README.md").write_text(
        "# Title\n\n"
        "[fine](docs/other.md#a-code-heading-here), [also fine](#title), [web](https://example.com/x.md)\n"
        "[gone](docs/missing.md) and [no such heading](docs/other.md#nowhere)\n"
        "`[not a link](nowhere.md)`\n\n"
        "```bash\ninrank-convert compress x -o y\ninrank-convert compres x -o y\n```\n"
        "and `python -m inrank_convert frobnicate x` in a span; inrank-convert bogus in prose is prose\n")
    files = pages(tmp_path)
    assert link_problems(files) == ["README.md: link to a missing file: docs/missing.md",
                                    "README.md: link to a missing heading: docs/other.md#nowhere"]
    assert command_problems(files, {"compress"}) == ["README.md: unknown command: inrank-convert compres",
                                                     "README.md: unknown command: inrank-convert frobnicate"]


def test_slugs_follow_mkdocs():
    assert slug("`compress CKPT [-o OUT]`") == "compress-ckpt-o-out"
    assert slug("For vLLM: `--target vllm`") == "for-vllm-target-vllm"
    assert slug("4. Rank selection, stored forms, budgets and calibration") == \
        "4-rank-selection-stored-forms-budgets-and-calibration"
