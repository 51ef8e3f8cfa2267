"""The docs tell the truth: every `docs/spec.md §N` citation names a section that exists, no citation points
at a file users do not have, the README's links and cited files exist, and CI runs the README's own test line."""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest

from flowmatch.cli.main import COMMANDS

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "docs" / "spec.md"
CITING = [REPO / "README.md", *[p for folder in ("flowmatch", "configs", "experiments", "docs", "tests")
                                for p in sorted((REPO / folder).rglob("*")) if p.suffix in (".py", ".yaml", ".md")
                                and p != Path(__file__).resolve()]]  # this file's own examples are not citations
# "docs/spec.md §5", "docs/spec.md §1-2", "docs/spec.md §2, §8", "docs/spec.md §1 and §4"
CITATION = re.compile(r"docs/spec\.md((?:(?:,\s*|\s+and\s+|\s+)§\d+(?:-\d+)?)+)")
BARE = re.compile(r"\bSPEC(?:\.md)?\b")  # the old name of the notes, which only the authors' machine had


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def spec_sections() -> set[int]:
    return {int(n) for n in re.findall(r"^## §(\d+)\. ", SPEC.read_text(), re.MULTILINE)}


def cited_sections(text: str) -> list[int]:
    cited = []
    for group in CITATION.findall(text):
        for first, last in re.findall(r"§(\d+)(?:-(\d+))?", group):
            cited += range(int(first), int(last or first) + 1)
    return cited


def test_spec_has_its_twelve_sections_in_order():
    numbers = [int(n) for n in re.findall(r"^## §(\d+)\. ", SPEC.read_text(), re.MULTILINE)]
    assert numbers == list(range(1, 13))


def test_the_citation_reader_reads_every_form():
    assert cited_sections("see docs/spec.md §5.") == [5]
    assert cited_sections("(docs/spec.md §1-2)") == [1, 2]
    assert cited_sections("(docs/spec.md §2, §8)") == [2, 8]
    assert cited_sections("docs/spec.md §1 and §4") == [1, 4]
    assert cited_sections("SD3 §5.2.1; docs/spec.md §13") == [13]


def test_every_spec_citation_names_an_existing_section():
    sections = spec_sections()
    bad = [f"{_rel(p)}: §{n}" for p in CITING for n in cited_sections(p.read_text(errors="replace")) if n not in sections]
    assert not bad, f"citations of sections docs/spec.md does not have: {bad}"
    assert sum(len(cited_sections(p.read_text(errors="replace"))) for p in CITING) > 30  # the reader finds them


def test_no_citation_of_the_old_spec_file_is_left():
    left = [f"{_rel(p)}:{i}" for p in CITING for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if BARE.search(line)]
    assert not left, f"cite docs/spec.md §N instead of SPEC: {left}"


# --- the README --------------------------------------------------------------------------------------------------
def setup_line(marker: str) -> str:
    """The indented command line that follows ``<!-- setup: MARKER -->`` in README.md."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index(f"<!-- setup: {marker} -->")
    line = next(line for line in lines[start + 1:] if line.strip())
    assert line.startswith("    "), f"the line after <!-- setup: {marker} --> must be an indented code line"
    return line.strip()


def test_two_setup_commands_install_the_same_way_and_run_the_main_job_and_the_tests():
    main_job, tests = setup_line("main job"), setup_line("tests")
    # torch (the CPU wheel) in its own pip call before the project, which would otherwise pull a CUDA build
    install = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e \".[dev]\" && "
    assert main_job == install + "python -m flowmatch fit --config experiments/mmdit_d16.yaml"
    assert tests == install + "python -m pytest -q"
    assert (REPO / "experiments" / "mmdit_d16.yaml").is_file()


def test_ci_runs_the_readme_test_line():
    ci = (REPO / ".ci" / "run").read_text()
    extract = re.search(r"line=\$\((awk .*README\.md)\)", ci)
    assert extract and "eval \"$line\"" in ci, ".ci/run must run the line it reads from README.md"
    got = subprocess.run(["bash", "-c", extract.group(1)], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert got == setup_line("tests")


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", _markdown_files(), ids=_rel)
def test_relative_links_resolve(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    broken = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert not broken, f"{_rel(page)} links to missing files: {broken}"


def _expand(path: str) -> list[str]:
    """configs/model/dit_{s2,b2}.yaml -> both names."""
    pieces = re.split(r"\{([^}]*)\}", path)
    options = [p.split(",") if i % 2 else [p] for i, p in enumerate(pieces)]
    return ["".join(choice) for choice in itertools.product(*options)]


@pytest.mark.parametrize("page", [p for p in _markdown_files() if p.name != "results.md"], ids=_rel)
def test_cited_config_files_exist(page):
    """results.md is left out: it is written from MLflow runs and names the configs they used at the time."""
    cited = re.findall(r"(?<![\w/.])((?:experiments|configs)/[\w/{},.-]*\.yaml)", page.read_text())
    missing = sorted({p for c in cited for p in _expand(c) if not (REPO / p).exists()})
    assert not missing, f"{_rel(page)} cites files that do not exist: {missing}"


def test_readme_commands_exist():
    used = set(re.findall(r"python -m flowmatch ([a-z][a-z0-9-]*)", (REPO / "README.md").read_text()))
    assert used and used <= set(COMMANDS), sorted(used - set(COMMANDS))
