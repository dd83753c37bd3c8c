"""The package's import boundaries: the runtime loads neither the toolkit nor any framework."""

import json
import subprocess
import sys


def test_import_loads_no_toolkit_and_no_framework():
    code = ("import json, sys, mlpm_guard; print(json.dumps(sorted(m for m in sys.modules "
            "if m.startswith(('mlpm_guard.toolkit', 'langchain', 'llama_index')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_exported_evaluation_types_are_the_toolkits():
    import mlpm_guard
    from mlpm_guard.toolkit import endtoend

    assert mlpm_guard.Answer is endtoend.Answer
    assert mlpm_guard.ExternalSystem is endtoend.ExternalSystem
