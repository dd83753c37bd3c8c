"""mlpm-guard for LlamaIndex answers: the guarded LLM and the guarded query and chat engines.

- :class:`MLPMGuardLLM`: a LlamaIndex LLM serving the guarded backbone (routes, streaming, async).
- :class:`GuardedQueryEngine` / :class:`GuardedChatEngine`: check the request before retrieval
  and hand its route to the guarded LLM (they live with the LLM because the route travels from
  one to the other within a request).
- :func:`evaluation_system`: a query engine as a system of the end-to-end evaluation.

Every piece takes a :class:`mlpm_guard.Guard`, or none for the process's shared default
(:func:`mlpm_guard.default_guard`, built on first use).
"""

from .base import MLPMGuardLLM
from .engine import GuardedChatEngine, GuardedQueryEngine
from .evaluation import evaluation_system

__all__ = ["GuardedChatEngine", "GuardedQueryEngine", "MLPMGuardLLM", "evaluation_system"]
