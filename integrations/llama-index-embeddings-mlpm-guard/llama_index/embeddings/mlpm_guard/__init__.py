"""mlpm-guard for LlamaIndex embeddings: :class:`BackboneEmbedding`, the guard's own backbone as an
embedding model (the definition of :func:`mlpm_guard.content_embeddings`; no second model to load)."""

from .base import BackboneEmbedding

__all__ = ["BackboneEmbedding"]
