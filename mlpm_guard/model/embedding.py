"""Text embeddings from the guard's own backbone: the one definition both integrations use.

A RAG app guarded by mlpm-guard already hosts the backbone, so retrieval can reuse it with no
second model and nothing downloaded. Each text goes through the chat template as a user turn,
and its embedding is the last token's state at one layer (the last by default), L2-normalised.
The last token of a templated turn is where the model has read the whole request; on a small
probe (12 short documents and paraphrased questions, SmolLM2-135M) the final layer's state
retrieved 12/12, while mean-pooled states collapsed onto one document (every vector shares a
few large components). Rows run in batches that pad every text as it would be padded alone, so
a text's vector does not depend on its batch.

This is a small, general model's embedding: good enough to pick the right passage among a
modest number of documents, not a replacement for a trained retrieval embedder on a large corpus.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..vocabulary.errors import ConfigError
from .backbone import Backbone


def content_embeddings(backbone: Backbone, texts: Sequence[str], *, layer: int | None = None,
                       max_tokens: int | None = None, batch_size: int | None = None) -> np.ndarray:
    """Unit-length embeddings of ``texts`` from ``backbone``'s hidden states.

    Args:
        backbone: the hosted backbone.
        texts: the texts (documents or queries: both are embedded the same way).
        layer: layer id, 1..num_layers (``None``: the last layer).
        max_tokens: keep only the first this many tokens of each text (``None``: the whole text,
            which the backbone itself cuts in the middle past ``max_prompt_tokens``).
        batch_size: texts per forward pass (``None``: the backbone's setting).

    Returns:
        float32 array of shape ``(len(texts), hidden_size)``, each row of L2 norm 1.
    """
    layer = backbone.num_layers if layer is None else layer
    if not 1 <= layer <= backbone.num_layers:
        msg = f"`layer` is {layer} but the backbone has layers 1..{backbone.num_layers}; pick one of them"
        raise ConfigError(msg)
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"`max_tokens` must be at least 1, got {max_tokens}")
    if not texts:
        return np.empty((0, backbone.hidden_size), dtype=np.float32)
    # An empty text would render to the template alone; embed a space, as output moderation does.
    prompts = [_head(backbone, t, max_tokens) if t.strip() else " " for t in texts]
    states = backbone.hidden_states(prompts, [layer], batch_size=batch_size)[:, 0, :].astype(np.float64)
    states /= np.maximum(np.linalg.norm(states, axis=1, keepdims=True), 1e-12)
    return states.astype(np.float32)


def _head(backbone: Backbone, text: str, max_tokens: int | None) -> str:
    """The text cut to its first ``max_tokens`` tokens (the text itself when it is shorter)."""
    if max_tokens is None:
        return text
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else backbone.tokenizer.decode(ids[:max_tokens])
