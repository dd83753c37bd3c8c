"""``MLPMEmbeddings``: the backbone's own hidden states as LangChain embeddings.

A RAG app guarded by mlpm-guard already hosts the backbone, so retrieval can reuse it: each text
goes through the chat template as a user turn, and its embedding is the last token's state at
one layer (the last by default), L2-normalised. The last token of a templated turn is where the
model has read the whole request; on a small probe (12 short documents and paraphrased
questions, SmolLM2-135M) the final layer's state retrieved 12/12, while mean-pooled states
collapsed onto one document (every vector shares a few large components).
"""

from __future__ import annotations

import numpy as np
from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field

from mlpm_guard import Backbone, ConfigError, default_guard


class MLPMEmbeddings(BaseModel, Embeddings):
    """Embed texts with a hosted backbone's hidden states.

    Args:
        backbone: the backbone (``None``: the shared default guard's, loaded on first use).
        layer: layer id, 1..num_layers (``None``: the last layer).
        batch_size: texts per forward pass (``None``: the backbone's setting).

    Example:
        ```python
        from langchain_core.vectorstores import InMemoryVectorStore
        from langchain_mlpm_guard import MLPMEmbeddings

        store = InMemoryVectorStore.from_texts(["Paris is in France."], MLPMEmbeddings(backbone=guard.backbone))
        ```
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    backbone: Backbone | None = None
    layer: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)

    def _backbone(self) -> Backbone:
        return self.backbone if self.backbone is not None else default_guard().backbone

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        backbone = self._backbone()
        layer = self.layer or backbone.num_layers
        if layer > backbone.num_layers:
            msg = f"`layer` is {layer} but the backbone has layers 1..{backbone.num_layers}; pick one of them"
            raise ConfigError(msg)
        # An empty text would render to the template alone; embed a space like the moderator does.
        states = backbone.hidden_states([t if t.strip() else " " for t in texts], [layer],
                                        batch_size=self.batch_size)[:, 0, :].astype(np.float64)
        states /= np.maximum(np.linalg.norm(states, axis=1, keepdims=True), 1e-12)
        return states.tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]
