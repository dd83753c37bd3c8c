"""What both integrations take from the core: one default guard, one embedding, one decision record."""

import threading
import time

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

import langchain_mlpm_guard as lc  # noqa: E402
import llama_index_mlpm_guard as li  # noqa: E402
import mlpm_guard  # noqa: E402
from mlpm_guard import defaults  # noqa: E402


@pytest.fixture
def counted_default(monkeypatch):
    """The default guard's builder replaced by a slow one that counts its calls (no model is loaded)."""
    built = []

    def build():
        time.sleep(0.05)  # wide enough for racing threads to all be inside `default_guard`
        built.append(object())
        return built[-1]

    monkeypatch.setattr(defaults, "_guard", None)
    monkeypatch.setattr(defaults, "_build", build)
    return built


def test_both_integrations_share_the_core_default_guard(counted_default):
    assert lc.default_guard is mlpm_guard.default_guard and li.default_guard is mlpm_guard.default_guard
    pieces = [lc.MLPMGuardRunnable(), lc.with_guard(lc.MLPMGuardRunnable()), li.MLPMGuardLLM(),
              li.MLPMGuardNodePostprocessor(), li.GuardedQueryEngine()]
    assert counted_default == []  # building adapters of either framework loads nothing
    guards = [p.resolved_guard() for p in pieces[:2]] + [p.guard for p in pieces[2:]]
    assert len(counted_default) == 1 and all(g is counted_default[0] for g in guards)


def test_the_default_guard_is_built_once_under_concurrent_first_use(counted_default):
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(mlpm_guard.default_guard())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(counted_default) == 1 and len(seen) == 8 and all(g is counted_default[0] for g in seen)
