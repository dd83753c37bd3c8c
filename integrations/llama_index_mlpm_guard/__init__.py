"""LlamaIndex integration of mlpm-guard: the guard at the query, the retrieved context and the answer.

- :class:`MLPMGuardLLM`: a LlamaIndex LLM serving the guarded backbone (routes, streaming, async).
- :class:`MLPMGuardNodePostprocessor`: drops or flags retrieved nodes the guard judges unsafe.
- :class:`GuardedQueryEngine` / :class:`GuardedChatEngine`: check the request before retrieval
  and hand its route to the guarded LLM.
- :class:`BackboneEmbedding`: embeddings from the same backbone (no second model to download).
- :class:`GuardDecisionEvent` / :class:`GuardNodesEvent`: the instrumentation events they dispatch.
- :func:`evaluation_system`: a query engine as a system of the end-to-end evaluation.

Every piece takes a :class:`mlpm_guard.Guard`, or none for the embedded default
(:func:`mlpm_guard.default_guard`), which is built on first use and shared by the whole process,
the LangChain integration included.
"""

from mlpm_guard import default_guard  # the core's one shared guard, re-exported

from ._shared import METADATA_KEY
from .embedding import BackboneEmbedding
from .engine import GuardedChatEngine, GuardedQueryEngine
from .evaluation import evaluation_system
from .events import GuardDecisionEvent, GuardNodesEvent
from .llm import MLPMGuardLLM
from .postprocessor import MLPMGuardNodePostprocessor

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
