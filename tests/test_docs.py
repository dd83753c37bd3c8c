"""The README and the docs site: the site builds in strict mode, and the code they show runs.

Code blocks follow one convention, checked here:

- a fenced ```python block runs, in page order, in one namespace per page, in a temporary folder
  (so a block may use a file an earlier block wrote);
- ``<!-- docs-test: skip REASON -->`` on the line before a block skips it, with that reason (for
  code that needs a running server, a GPU, Ray or a network);
- ``<!-- docs-test: hidden`` ... ``-->`` holds code that runs in its place in the page but is not
  shown (stand-ins a snippet assumes, such as a fake chat model, or clean-up of global settings);
- in ```bash blocks, every ``mlpm-guard`` line names a real subcommand and options it accepts.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s+(.+?)\s*-->\s*$")
HIDDEN = re.compile(r"<!--\s*docs-test:\s*hidden\s*\n(.*?)-->", re.S)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    skip: str | None = None


def blocks(page: Path) -> list[Block]:
    """The page's fenced blocks, with hidden code as blocks of their own, in page order."""
    text = page.read_text(encoding="utf-8")
    found: list[Block] = []
    for m in HIDDEN.finditer(text):
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, "python", m.group(1)))
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        found.append(Block(page, line, m.group(1), m.group(2), skip.group(1) if skip else None))
    return sorted(found, key=lambda b: b.line)


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang == "python" for b in blocks(p))]


@pytest.fixture
def shared_backbone(backbone, monkeypatch):
    """``Backbone()`` with no arguments returns the session's embedded backbone (one load per run)."""
    import mlpm_guard.guardrail.guard as guard_module

    real = guard_module.Backbone

    class SharedBackbone(real):
        def __new__(cls, spec=None, *args, **kwargs):
            if isinstance(spec, real):
                return spec
            if spec is None and not args and not kwargs:
                return backbone
            return real(spec, *args, **kwargs)

    monkeypatch.setattr(guard_module, "Backbone", SharedBackbone)
    import mlpm_guard.guardrail.defaults as defaults

    monkeypatch.setattr(defaults, "_guard", None)  # a default guard built here is this test's own
    return backbone


@pytest.mark.slow
@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(page, shared_backbone, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    namespace: dict = {"__name__": "__docs__"}
    ran, skipped = 0, []
    for block in blocks(page):
        if block.lang != "python":
            continue
        if block.skip:
            skipped.append(f"line {block.line}: {block.skip}")
            continue
        where = f"{page.relative_to(ROOT)}:{block.line}"
        try:
            exec(compile(block.code, where, "exec"), namespace)
        except Exception as exc:  # report the page and line, then the original traceback
            raise AssertionError(f"the code block at {where} failed: {exc!r}") from exc
        ran += 1
    if not ran:
        pytest.skip(f"{page.name}: every python block is marked to skip: " + "; ".join(skipped))


def test_every_skip_says_why():
    for page in PAGES:
        for block in blocks(page):
            if block.skip is not None:
                assert len(block.skip.split()) >= 2, f"{page.name}:{block.line}: a skip needs a reason"


def _cli_parser():
    from mlpm_guard import cli

    return cli.build_parser()


def _subcommands(parser) -> dict:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_shell_commands_name_real_options():
    subs = _subcommands(_cli_parser())
    checked = 0
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in ("bash", "sh", "console") or block.skip:
                continue
            for raw in block.code.replace("\\\n", " ").splitlines():
                line = raw.split("#", 1)[0].strip()
                line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # VAR=value in front
                if not line.startswith("mlpm-guard "):
                    continue
                words = shlex.split(line)
                where = f"{page.relative_to(ROOT)}:{block.line}: {line}"
                if words[1].startswith("-"):
                    continue  # mlpm-guard --version / --help
                assert words[1] in subs, f"{where}: no subcommand {words[1]!r}"
                command, parser, rest = [words[1]], subs[words[1]], words[2:]
                while rest and _subcommands(parser):  # mlpm-guard GROUP COMMAND ...
                    assert rest[0] in _subcommands(parser), f"{where}: no subcommand {' '.join(command)} {rest[0]!r}"
                    command.append(rest[0])
                    parser, rest = _subcommands(parser)[rest[0]], rest[1:]
                options = {opt for action in parser._actions for opt in action.option_strings}
                for word in rest:
                    flag = word.strip("[]").split("=", 1)[0]
                    if flag.startswith("--"):
                        assert flag in options, f"{where}: `mlpm-guard {' '.join(command)}` has no option {flag}"
                checked += 1
    assert checked >= 10  # the pages do show the command line


def test_readme_fits_and_keeps_its_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert "make demo   # installs into .venv and runs the main job on the embedded default backbone\n" in text
    assert "make test   # installs into .venv and runs the tests\n" in text


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local
    for link in local:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_no_step_numbers_in_text():
    pattern = re.compile(r"\bstops? [0-9]+", re.I)
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "site", "runs") and not d.endswith(".egg-info")]
        for path in (Path(folder) / f for f in files if f.endswith((".py", ".md", ".yaml", ".yml"))):
            found += _step_numbers(path, pattern)
    assert not found, "\n".join(found)


def _step_numbers(path: Path, pattern) -> list[str]:
    found = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if pattern.search(line):
            found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    return found


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "quality" / "index.html").is_file()
    reference = (tmp_path / "site" / "reference" / "index.html").read_text(encoding="utf-8")
    assert "Score, route, answer and moderate requests" in reference  # Guard's docstring, rendered
    assert ":class:<code>" not in reference  # mkdocs_hooks.py drops Sphinx roles


def test_ray_serve_replicas_wait_passively():
    # The config's ray_actor_options replace the deployment's own, runtime_env included.
    import yaml

    config = yaml.safe_load((ROOT / "docs" / "ray-serve.yaml").read_text(encoding="utf-8"))
    for app in config["applications"]:
        for deployment in app["deployments"]:
            env = deployment["ray_actor_options"]["runtime_env"]["env_vars"]
            assert env["OMP_WAIT_POLICY"] == "PASSIVE", deployment["name"]
