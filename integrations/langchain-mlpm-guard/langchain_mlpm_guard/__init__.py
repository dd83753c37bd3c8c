"""LangChain integration of mlpm-guard.

Public names: :class:`MLPMGuardMiddleware` (the guard inside a ``create_agent`` agent),
:class:`MLPMGuardRunnable` (the guarded hosted backbone as a runnable),
:class:`ChatMLPMGuard` (the same as a chat model), :func:`with_guard` (guard any runnable whose
own LLM answers), :class:`MLPMDocumentFilter` (drop or flag unsafe retrieved documents),
:class:`MLPMEmbeddings` (embeddings from the backbone) and :func:`evaluation_system` (a runnable
as a system of the end-to-end evaluation).

Importing this package registers ``Runnable.with_guard``, so ``chain.with_guard(guard, ...)``
is ``with_guard(chain, guard, ...)``. The method is added to
``langchain_core.runnables.Runnable`` only if that class has no attribute of that name: an
existing ``with_guard`` (from LangChain or another package) is never overwritten, and a warning
says so. :func:`with_guard` works either way.
"""

from __future__ import annotations

import warnings
from typing import Any

from langchain_core.runnables import Runnable

from mlpm_guard import default_guard  # the core's one shared guard, re-exported

from ._common import EVENT_NAME, FLAG_KEY, GuardedText
from .chat_model import ChatMLPMGuard
from .documents import MLPMDocumentFilter
from .embeddings import MLPMEmbeddings
from .evaluation import evaluation_system
from .guarded import GuardedRunnable, with_guard
from .runnable import MLPMGuardRunnable

try:  # the agent middleware needs the `langchain` package (1.x), not only langchain-core
    from .middleware import MLPMGuardMiddleware
except ImportError as _exc:  # pragma: no cover - depends on what is installed
    _MIDDLEWARE_ERROR = _exc

    def __getattr__(name: str) -> Any:
        if name == "MLPMGuardMiddleware":
            msg = f"MLPMGuardMiddleware needs `langchain>=1.0` and `langgraph` (pip install langchain-mlpm-guard): " \
                  f"{_MIDDLEWARE_ERROR}"
            raise ImportError(msg)
        raise AttributeError(name)

__all__ = [
    "EVENT_NAME",
    "FLAG_KEY",
    "ChatMLPMGuard",
    "GuardedRunnable",
    "GuardedText",
    "MLPMDocumentFilter",
    "MLPMEmbeddings",
    "MLPMGuardMiddleware",
    "MLPMGuardRunnable",
    "default_guard",
    "evaluation_system",
    "register_with_guard",
    "with_guard",
]


def _with_guard_method(self: Runnable[Any, Any], guard: Any = None, **options: Any) -> GuardedRunnable:
    """Guard this runnable with mlpm-guard (same as ``langchain_mlpm_guard.with_guard(self, guard, ...)``)."""
    return with_guard(self, guard, **options)


def register_with_guard() -> bool:
    """Add ``with_guard`` to ``Runnable`` unless something already holds that name.

    Returns:
        True when ``Runnable.with_guard`` is (now) this package's method.
    """
    current = getattr(Runnable, "with_guard", None)
    if current is _with_guard_method:
        return True
    if current is not None:
        warnings.warn("langchain_core Runnable already has a `with_guard` attribute; leaving it alone. "
                      "Use `langchain_mlpm_guard.with_guard(chain, guard)` instead.", stacklevel=2)
        return False
    Runnable.with_guard = _with_guard_method  # type: ignore[attr-defined]
    return True


register_with_guard()
