"""What both integrations take from the core: one default guard, one embedding, one decision record."""

import threading
import time

import numpy as np
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


def test_both_integrations_embed_with_the_core_definition(backbone):
    texts = ["The office opens at nine.", "", "Photosynthesis turns sunlight into sugar."]
    core = mlpm_guard.content_embeddings(backbone, texts)
    assert core.dtype == np.float32 and core.shape == (3, backbone.hidden_size)
    assert np.allclose(np.linalg.norm(core, axis=1), 1.0, atol=1e-6)
    langchain = lc.MLPMEmbeddings(backbone=backbone)
    llama_index = li.BackboneEmbedding(backbone)
    assert np.allclose(langchain.embed_documents(texts), core, atol=1e-6)
    assert np.allclose(langchain.embed_query(texts[2]), core[2], atol=1e-6)
    assert np.allclose(llama_index.get_text_embedding_batch(texts), core, atol=1e-6)
    assert np.allclose(llama_index.get_query_embedding(texts[2]), core[2], atol=1e-6)
    # `max_length` keeps the start of a text, as the core's `max_tokens` does
    head = backbone.tokenizer.decode(backbone.tokenizer(texts[2], add_special_tokens=False)["input_ids"][:3])
    cut = li.BackboneEmbedding(backbone, max_length=3).get_text_embedding(texts[2])
    assert np.allclose(cut, mlpm_guard.content_embeddings(backbone, [head])[0], atol=1e-6)
    assert mlpm_guard.content_embeddings(backbone, []).shape == (0, backbone.hidden_size)
    with pytest.raises(mlpm_guard.ConfigError, match="layer"):
        mlpm_guard.content_embeddings(backbone, texts, layer=0)
