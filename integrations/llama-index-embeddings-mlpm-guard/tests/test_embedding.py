"""The backbone embedding on the embedded backbone: normalised, independent of its batch, and
ranking passages by meaning."""

import numpy as np
import pytest

pytest.importorskip("llama_index.core")

from llama_index.embeddings.mlpm_guard import BackboneEmbedding  # noqa: E402

from mlpm_guard import Guard  # noqa: E402

SAFE_DOC = "The office is open Monday to Friday from 9 am to 5 pm."


@pytest.fixture(scope="module")
def guard(backbone, small_prototypes):
    return Guard(backbone, small_prototypes)


def test_backbone_embedding_is_normalised_batch_independent_and_ranks(guard):
    embed = BackboneEmbedding(guard)
    docs = [SAFE_DOC, "Photosynthesis turns sunlight, water and carbon dioxide into glucose.",
            "Members may borrow up to five books for three weeks."]
    D = np.array(embed.get_text_embedding_batch(docs))
    assert np.allclose(np.linalg.norm(D, axis=1), 1.0, atol=1e-5)
    alone = np.array(embed.get_text_embedding(docs[1]))
    assert D[1] @ alone > 0.999  # padding does not leak in (beyond bfloat16 rounding)
    queries = ["How do plants make sugar?", "How many books can I borrow?"]
    Q = np.array([embed.get_query_embedding(q) for q in queries])
    assert (Q @ D.T).argmax(axis=1).tolist() == [1, 2]
