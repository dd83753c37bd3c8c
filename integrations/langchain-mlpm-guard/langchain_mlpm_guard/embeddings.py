"""``MLPMEmbeddings``: the backbone's own hidden states as LangChain embeddings.

The embedding is :func:`mlpm_guard.model.embedding.content_embeddings` (the last token's state of the
text as a chat-templated user turn, L2-normalised), the same as LlamaIndex's ``BackboneEmbedding``.
"""

from __future__ import annotations

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field

from mlpm_guard import Backbone, content_embeddings
from mlpm_guard.guardrail.binding import resolve_backbone


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
        return resolve_backbone(self.backbone)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return content_embeddings(self._backbone(), texts, layer=self.layer, batch_size=self.batch_size).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]
