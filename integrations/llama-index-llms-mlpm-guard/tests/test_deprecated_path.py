"""The old import path, ``llama_index_mlpm_guard``, for one release: it warns and hands out the
objects of the namespace packages."""

import importlib
import sys

import pytest

pytest.importorskip("llama_index.core")

import llama_index.embeddings.mlpm_guard as embeddings  # noqa: E402
import llama_index.llms.mlpm_guard as llms  # noqa: E402
import llama_index.postprocessor.mlpm_guard as postprocessor  # noqa: E402

import mlpm_guard  # noqa: E402


def test_the_old_path_warns_and_is_the_new_packages(monkeypatch):
    monkeypatch.delitem(sys.modules, "llama_index_mlpm_guard", raising=False)
    with pytest.warns(DeprecationWarning, match="llama_index.llms.mlpm_guard"):
        old = importlib.import_module("llama_index_mlpm_guard")
    for package in (llms, postprocessor, embeddings):
        for name in package.__all__:
            assert getattr(old, name) is getattr(package, name), name
    assert old.default_guard is mlpm_guard.default_guard
    assert sorted(old.__all__) == sorted({*llms.__all__, *postprocessor.__all__, *embeddings.__all__, "default_guard"})
