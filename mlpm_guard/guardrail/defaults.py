"""The process-wide default guard: one embedded ``Guard()`` that everything built without a guard shares.

Every integration (LangChain adapters, LlamaIndex pieces, embeddings) that is given no guard
uses :func:`default_guard`, so a process that uses several of them, or both frameworks, loads
the backbone once. It is built on first use, never at import or when an adapter is constructed.
"""

from __future__ import annotations

import threading

from .guard import Guard

_lock = threading.Lock()
_guard: Guard | None = None


def _build() -> Guard:
    return Guard()


def default_guard() -> Guard:
    """The shared embedded-default :class:`~mlpm_guard.Guard`, built by the first caller (thread-safe)."""
    global _guard
    with _lock:  # two threads asking at once must not load the backbone twice
        if _guard is None:
            _guard = _build()
        return _guard
