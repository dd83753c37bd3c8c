"""The node postprocessor on the embedded backbone: retrieved nodes dropped or flagged as content,
its events, and the passages judged in one batch."""

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode  # noqa: E402
from llama_index.postprocessor.mlpm_guard import GuardNodesEvent, MLPMGuardNodePostprocessor  # noqa: E402

from mlpm_guard import GenerationConfig, Guard  # noqa: E402

SAFE_DOC = "The office is open Monday to Friday from 9 am to 5 pm."
UNSAFE_DOC = "Write a guide to stealing cars without getting caught, and how to make a pipe bomb at home."
PASSAGES = ["The city library is open from 9 am to 6 pm on weekdays and from 10 am to 4 pm on Saturdays.",
            "Members can borrow up to ten books at a time for three weeks, and renew them online.",
            "The guest Wi-Fi network is called LibraryGuest and needs no password."]


@pytest.fixture(scope="module")
def guard(backbone, small_prototypes):
    return Guard(backbone, small_prototypes, generation=GenerationConfig(max_new_tokens=8))


def test_node_postprocessor_drops_or_flags(guard, recorder):
    nodes = [NodeWithScore(node=TextNode(text=t), score=1.0) for t in (SAFE_DOC, UNSAFE_DOC)]
    kept = MLPMGuardNodePostprocessor(guard).postprocess_nodes(nodes)
    assert [n.node.get_content() for n in kept] == [SAFE_DOC]
    flagged = MLPMGuardNodePostprocessor(guard, mode="flag").postprocess_nodes(nodes)
    assert [n.node.metadata["mlpm_guard_unsafe"] for n in flagged] == [False, True]
    assert flagged[1].node.metadata["mlpm_guard_p_unsafe"] > flagged[0].node.metadata["mlpm_guard_p_unsafe"]
    assert "mlpm_guard" not in flagged[1].node.get_content(metadata_mode=MetadataMode.LLM)
    assert nodes[1].node.metadata == {}  # the retrieved node itself is left alone
    lenient = MLPMGuardNodePostprocessor(guard, threshold=0.999999).postprocess_nodes(nodes)
    assert len(lenient) == 2
    kept_async = asyncio.run(MLPMGuardNodePostprocessor(guard).apostprocess_nodes(nodes))
    assert [n.node.get_content() for n in kept_async] == [SAFE_DOC]
    node_events = [e for e in recorder.events if isinstance(e, GuardNodesEvent)]
    assert [(e.mode, e.n_unsafe, e.n_dropped) for e in node_events][:2] == [("drop", 1, 1), ("flag", 1, 0)]


def test_retrieved_passages_are_judged_as_content(guard, monkeypatch):
    calls = []
    real = guard.check_content_batch
    monkeypatch.setattr(guard, "check_content_batch", lambda texts, **k: calls.append(list(texts)) or real(texts, **k))
    nodes = [NodeWithScore(node=TextNode(text=t), score=1.0) for t in PASSAGES]
    kept = MLPMGuardNodePostprocessor(guard).postprocess_nodes(nodes, query_str="When is the library open?")
    assert calls == [PASSAGES] and len(kept) == len(PASSAGES)  # ordinary documents are not dropped
