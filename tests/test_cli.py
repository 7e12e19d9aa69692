"""The command line's own options (each subcommand is tested with what it drives)."""

import importlib.metadata
import re
from pathlib import Path

import pytest

import autoprune
from autoprune.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    project = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert importlib.metadata.version("autoprune") == autoprune.__version__ == project
    assert capsys.readouterr().out == f"autoprune {project}\n"


def test_every_version_has_a_changelog_entry():
    version = autoprune.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"\n## [{version}] - " in changelog
