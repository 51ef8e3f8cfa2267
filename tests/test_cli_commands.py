"""`python -m flowmatch --help` and the CLI package's docstring list every command, each with a line of help,
and every command module answers `--help`."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import flowmatch.cli
from flowmatch.cli.main import COMMANDS, LIGHTNING_COMMANDS, OWN_COMMANDS, main

CLI_DIR = Path(flowmatch.cli.__file__).parent
NOT_COMMANDS = {"__init__", "main", "lightning_cli"}  # the dispatcher and the LightningCLI subclass


def test_help_lists_every_command_with_a_description(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        line = re.search(rf"^  {re.escape(name)} +(\S.*)$", out, re.MULTILINE)
        assert line, f"--help does not list {name!r}:\n{out}"
        assert len(line.group(1)) > 10, f"{name}: its help line says too little"


def test_package_docstring_lists_every_command():
    doc = flowmatch.cli.__doc__
    listed = set(re.findall(r"^    ([a-z][a-z0-9-]*) {2,}\S", doc, re.MULTILINE))
    assert listed == set(COMMANDS), f"flowmatch/cli/__init__.py lists {sorted(listed)}, the CLI has {sorted(COMMANDS)}"


def test_every_command_module_is_a_command():
    """A new file in flowmatch/cli/ with a main() is reachable from `python -m flowmatch`."""
    modules = {p.stem for p in CLI_DIR.glob("*.py")} - NOT_COMMANDS
    reachable = {module.rsplit(".", 1)[1] for module in OWN_COMMANDS.values()}
    assert modules == reachable, f"not wired into COMMANDS: {sorted(modules - reachable)}"
    assert LIGHTNING_COMMANDS == {"fit", "validate", "test", "predict"}


@pytest.mark.parametrize("name", sorted(OWN_COMMANDS))
def test_each_own_command_explains_itself(name, capsys):
    module = importlib.import_module(OWN_COMMANDS[name])
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out.lower()


def test_an_unknown_command_is_an_error_that_shows_the_commands(capsys):
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nonsense'" in err and "convert-checkpoint" in err
