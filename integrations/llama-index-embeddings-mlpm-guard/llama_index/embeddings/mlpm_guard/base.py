"""``BackboneEmbedding``: text embeddings from the guard's own backbone, so a RAG app needs no
second model and nothing downloaded.

The embedding is :func:`mlpm_guard.model.embedding.content_embeddings` (the last token's state of the
text as a chat-templated user turn, L2-normalised), the same as LangChain's ``MLPMEmbeddings``.
"""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from mlpm_guard import Backbone, Guard, content_embeddings
from mlpm_guard.guardrail.binding import resolve_backbone


class BackboneEmbedding(BaseEmbedding):
    """A LlamaIndex embedding model backed by a :class:`mlpm_guard.Backbone`.

    Args:
        backbone: a :class:`mlpm_guard.Backbone` or a :class:`mlpm_guard.Guard` (its backbone);
            ``None``: the shared default guard's backbone.
        max_length: texts are cut to this many tokens (the start is kept).
    """

    max_length: int = Field(default=512, ge=1, description="tokens kept per text (from the start)")

    _backbone: Optional[Backbone] = PrivateAttr(default=None)

    def __init__(self, backbone: Backbone | Guard | None = None, **kwargs: Any) -> None:
        if isinstance(backbone, Guard):
            backbone = backbone.backbone
        if backbone is not None and not isinstance(backbone, Backbone):
            msg = (f"`backbone` of BackboneEmbedding must be a mlpm_guard.Backbone, a Guard or None, "
                   f"got {type(backbone).__name__}")
            raise TypeError(msg)
        kwargs.setdefault("model_name", "mlpm-guard-backbone")
        super().__init__(**kwargs)
        self._backbone = backbone

    @classmethod
    def class_name(cls) -> str:
        return "BackboneEmbedding"

    @property
    def backbone(self) -> Backbone:
        return resolve_backbone(self._backbone)

    def _embed(self, texts: List[str]) -> List[Embedding]:
        return content_embeddings(self.backbone, texts, max_tokens=self.max_length).tolist()

    def _get_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return self._embed(texts)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text])[0]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query])[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)
