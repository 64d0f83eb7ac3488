"""The `segicl` command: help works and every declared subcommand plugin loads."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from segicl import cli


def test_help_lists_every_registered_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for ep in entry_points(group="segicl.commands"):
        assert ep.name in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    assert "usage: segicl" in capsys.readouterr().out


def test_unknown_command_is_an_error() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2


def test_help_does_not_import_heavy_libraries() -> None:
    code = "import sys; from segicl import cli; cli.build_parser(); print(sorted(m for m in ('torch', 'faiss', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
