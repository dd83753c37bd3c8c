"""Deprecated: the LlamaIndex integration's old import path, kept for one release.

The pieces now live in LlamaIndex's namespaces, one distribution per kind:
``llama_index.llms.mlpm_guard`` (``MLPMGuardLLM``, ``GuardedQueryEngine``, ``GuardedChatEngine``,
``evaluation_system``), ``llama_index.postprocessor.mlpm_guard`` (``MLPMGuardNodePostprocessor``,
the instrumentation events, ``METADATA_KEY``) and ``llama_index.embeddings.mlpm_guard``
(``BackboneEmbedding``). Importing this module warns and hands out the same objects.
"""

import warnings

from llama_index.embeddings.mlpm_guard import BackboneEmbedding
from llama_index.llms.mlpm_guard import GuardedChatEngine, GuardedQueryEngine, MLPMGuardLLM, evaluation_system
from llama_index.postprocessor.mlpm_guard import (
    METADATA_KEY,
    GuardDecisionEvent,
    GuardNodesEvent,
    MLPMGuardNodePostprocessor,
)
from mlpm_guard import default_guard

warnings.warn("`llama_index_mlpm_guard` is deprecated and will be removed in the next release; import from "
              "`llama_index.llms.mlpm_guard`, `llama_index.postprocessor.mlpm_guard` and "
              "`llama_index.embeddings.mlpm_guard` instead", DeprecationWarning, stacklevel=2)

__all__ = [
    "METADATA_KEY",
    "BackboneEmbedding",
    "GuardDecisionEvent",
    "GuardNodesEvent",
    "GuardedChatEngine",
    "GuardedQueryEngine",
    "MLPMGuardLLM",
    "MLPMGuardNodePostprocessor",
    "default_guard",
    "evaluation_system",
]
