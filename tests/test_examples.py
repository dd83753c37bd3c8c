"""The examples run as they are, offline, and show what their docstrings promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=600, cwd=EXAMPLES.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_langchain_guarded_chain_example():
    out = run("langchain_guarded_chain.py", "--max-new-tokens", "8")
    assert out.count("route=refuse") == 2  # the harmful question, in both chains
    assert "=== stream ===" in out


@pytest.mark.slow
def test_langchain_rag_example():
    out = run("langchain_rag.py", "--max-new-tokens", "8")
    assert "dropped: ['forum']" in out  # the poisoned passage never reaches the prompt
    assert "[input] route=refuse" in out


@pytest.mark.slow
def test_llamaindex_rag_example():
    out = run("llamaindex_rag.py")
    assert "dropped: ['forum_post.txt']" in out
    assert out.count("retrieval: none (refused before retrieval)") == 2


@pytest.mark.slow
def test_langchain_agent_example():
    out = run("langchain_agent.py")
    assert "agent: The tool said: Sunny in Paris" in out  # an ordinary tool result reaches the model
    assert "route=refuse blocked=True" in out  # the harmful turn
    assert out.count("tool result withheld") == 1  # the injected forum post, only
    assert "thread: human ai tool ai human ai tool ai human ai" in out  # the refusal is kept in the thread
