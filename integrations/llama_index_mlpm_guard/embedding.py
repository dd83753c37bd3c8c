"""``BackboneEmbedding``: text embeddings from the guard's own backbone, so a RAG app needs no
second model and nothing downloaded.

A text is run through the decoder as plain text (no chat template) and its final-layer states
are mean-pooled over the real tokens, leaving out the first one: decoder LMs park a very large
activation on the first position (an "attention sink"), which would otherwise dominate every
mean and make all texts look alike. Vectors are L2-normalised. This is a small, general model's
embedding: good enough to pick the right passage among a modest number of documents, not a
replacement for a trained retrieval embedder on a large corpus.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from mlpm_guard import Backbone, Guard, default_guard
from mlpm_guard.backbone import Encoded


class BackboneEmbedding(BaseEmbedding):
    """A LlamaIndex embedding model backed by a :class:`mlpm_guard.Backbone`.

    Args:
        backbone: a :class:`mlpm_guard.Backbone` or a :class:`mlpm_guard.Guard` (its backbone);
            ``None``: the shared default guard's backbone.
        max_length: texts are cut to this many tokens (the start is kept).
    """

    max_length: int = Field(default=512, ge=2, description="tokens kept per text (from the start)")

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
        return self._backbone if self._backbone is not None else default_guard().backbone

    @torch.inference_mode()
    def _embed(self, texts: List[str]) -> List[Embedding]:
        backbone = self.backbone
        ids = backbone.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        rows = [Encoded(tuple(row[: self.max_length] or [backbone.tokenizer.pad_token_id])) for row in ids]
        batch = backbone.collate(rows)
        states = backbone.model.base_model(**batch, use_cache=False).last_hidden_state.float()
        mask = batch["attention_mask"].clone()
        # Left padding: each row's first real token sits at width - length. Keep it only in a
        # one-token text, which has nothing else to pool.
        width = mask.shape[1]
        for j, row in enumerate(rows):
            if len(row) > 1:
                mask[j, width - len(row)] = 0
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().tolist()

    def _get_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return self._embed(texts)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text])[0]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query])[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        import asyncio

        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        import asyncio

        return await asyncio.to_thread(self._get_text_embedding, text)
