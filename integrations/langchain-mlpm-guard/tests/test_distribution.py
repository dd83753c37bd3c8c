"""The distribution: its import path, its version, and a core that never imports it."""

import json
import subprocess
import sys
from importlib.metadata import version

import pytest

pytest.importorskip("langchain_core")

import langchain_mlpm_guard  # noqa: E402


def test_the_distribution_and_its_import_path():
    assert version("langchain-mlpm-guard") == "0.1.0"
    assert {"with_guard", "ChatMLPMGuard", "MLPMGuardMiddleware", "MLPMDocumentFilter"} <= set(langchain_mlpm_guard.__all__)


def test_importing_the_core_loads_no_langchain():
    code = ("import json, sys, mlpm_guard; print(json.dumps(sorted(m for m in sys.modules "
            "if m.startswith(('langchain', 'langgraph')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
