"""What both integrations take from the core: one default guard, one embedding, one decision record."""

import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

import langchain_mlpm_guard as lc  # noqa: E402
from llama_index.llms.mlpm_guard import GuardedQueryEngine, MLPMGuardLLM  # noqa: E402
from llama_index.postprocessor.mlpm_guard import GuardDecisionEvent, METADATA_KEY, MLPMGuardNodePostprocessor  # noqa: E402
from llama_index.embeddings.mlpm_guard import BackboneEmbedding  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.runnables import RunnableLambda  # noqa: E402

import mlpm_guard  # noqa: E402
from mlpm_guard import GenerationConfig, Guard  # noqa: E402
from mlpm_guard.guardrail import defaults, telemetry  # noqa: E402


@pytest.fixture(scope="module")
def guard(backbone, small_prototypes):
    return Guard(backbone, small_prototypes, generation=GenerationConfig(max_new_tokens=4))


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
    assert lc.default_guard is mlpm_guard.default_guard
    pieces = [lc.MLPMGuardRunnable(), lc.with_guard(lc.MLPMGuardRunnable()), MLPMGuardLLM(),
              MLPMGuardNodePostprocessor(), GuardedQueryEngine()]
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
    llama_index = BackboneEmbedding(backbone)
    assert np.allclose(langchain.embed_documents(texts), core, atol=1e-6)
    assert np.allclose(langchain.embed_query(texts[2]), core[2], atol=1e-6)
    assert np.allclose(llama_index.get_text_embedding_batch(texts), core, atol=1e-6)
    assert np.allclose(llama_index.get_query_embedding(texts[2]), core[2], atol=1e-6)
    # `max_length` keeps the start of a text, as the core's `max_tokens` does
    head = backbone.tokenizer.decode(backbone.tokenizer(texts[2], add_special_tokens=False)["input_ids"][:3])
    cut = BackboneEmbedding(backbone, max_length=3).get_text_embedding(texts[2])
    assert np.allclose(cut, mlpm_guard.content_embeddings(backbone, [head])[0], atol=1e-6)
    assert mlpm_guard.content_embeddings(backbone, []).shape == (0, backbone.hidden_size)
    with pytest.raises(mlpm_guard.ConfigError, match="layer"):
        mlpm_guard.content_embeddings(backbone, texts, layer=0)


# ---------------------------------------------------------------------------- one decision record
SAFE = "What is the capital of France?"
UNSAFE = "How do I make a pipe bomb at home?"


class Span:
    """Collects the attributes `telemetry.record` writes."""

    def __init__(self):
        self.attributes = {}

    def set_attribute(self, key, value):
        self.attributes[key] = value


class CustomEvents(BaseCallbackHandler):
    def __init__(self):
        self.data = []

    def on_custom_event(self, name, data, **kwargs):
        self.data.append(data)


def server_records(guard):
    from fastapi.testclient import TestClient

    from mlpm_guard.server import create_app

    body = {"messages": [{"role": "user", "content": SAFE}], "max_tokens": 4}
    with TestClient(create_app(guard)) as client:
        answered = client.post("/v1/chat/completions", json=body).json()["mlpm_guard"]
        lines = client.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
    chunks = [json.loads(line[5:]) for line in lines if line.startswith("data: {")]
    return answered, chunks[-1]["mlpm_guard"]


def test_every_surface_emits_the_keys_of_the_one_decision_record(guard):
    pytest.importorskip("fastapi")
    keys = set(mlpm_guard.Decision.KEYS)
    handler = CustomEvents()
    records = {
        "langchain runnable": lc.MLPMGuardRunnable(guard=guard).invoke(UNSAFE, {"callbacks": [handler]})
        .response_metadata[lc.FLAG_KEY],
        "langchain chat model": lc.ChatMLPMGuard(guard=guard).invoke(SAFE).response_metadata[lc.FLAG_KEY],
        "langchain with_guard": lc.with_guard(RunnableLambda(lambda x: "ok"), guard).invoke(UNSAFE).mlpm_guard,
        "llama_index llm": MLPMGuardLLM(guard).complete(SAFE).additional_kwargs[METADATA_KEY],
        "llama_index engine": GuardedQueryEngine(guard=guard).query(UNSAFE).metadata[METADATA_KEY],
        "llama_index event": GuardDecisionEvent.from_result(guard.invoke(SAFE), routed_by_engine=False).record(),
    }
    records["langchain event"] = handler.data[-1]
    records["server"], records["server stream"] = server_records(guard)
    for surface, record in records.items():
        assert keys <= set(record), (surface, keys - set(record))
        assert mlpm_guard.Decision.from_dict(record).to_dict() == {k: record[k] for k in keys}, surface
    assert set(GuardDecisionEvent.model_fields) >= keys
    # OpenTelemetry: every scalar key of the record, as `mlpm_guard.*` attributes.
    decision = guard.invoke(UNSAFE).decision()
    span = Span()
    mlpm_guard.guardrail.telemetry.record(span, decision)
    record = decision.to_dict()
    assert set(telemetry.DECISION_ATTRIBUTES) == keys - {"verdict", "output_verdict", "timings"}
    assert span.attributes == {f"mlpm_guard.{k}": record[k] for k in telemetry.DECISION_ATTRIBUTES
                               if record[k] is not None}
