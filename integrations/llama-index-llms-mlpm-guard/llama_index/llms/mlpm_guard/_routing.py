"""The route a guarded engine hands to the guarded LLM for one request, and the report of a
guarded LLM call.

The route travels in a :class:`contextvars.ContextVar`, never on an instance, so concurrent
requests through one engine (threads or asyncio tasks) each see only their own route.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from mlpm_guard import GuardResult, Policy, Route, Verdict

@dataclass
class RouteDirective:
    """The route a guarded engine chose for one request, for the guarded LLM to apply.

    ``policy`` is the engine's policy with every tier sent to ``route``, so the LLM answers
    the templated RAG prompt exactly as the engine decided on the bare query. ``applied`` is
    set by the guarded LLM when it takes the route; it stays ``False`` when the engine's LLM
    is not an :class:`MLPMGuardLLM` (the route then could not be applied). ``reports`` collects
    the guarded LLM's report of each call it answers for this request.

    The engine's own report is *watched*: its ``route_applied`` and ``blocked`` stay current as
    the LLM's calls happen, which for a streaming response is after the engine has returned.
    """

    route: Route
    verdict: Verdict
    policy: Policy
    applied: bool = False
    reports: list[dict[str, Any]] = field(default_factory=list)
    watchers: list[dict[str, Any]] = field(default_factory=list)

    def watch(self, report: dict[str, Any]) -> dict[str, Any]:
        """Keep ``report["route_applied"]`` and ``report["blocked"]`` current; returns ``report``."""
        self.watchers.append(report)
        self._update()
        return report

    def claim(self) -> RouteDirective:
        """Called by the guarded LLM as it takes the route."""
        self.applied = True
        self._update()
        return self

    def record(self, report: dict[str, Any]) -> None:
        """Called by the guarded LLM with the report of a call it answered for this request."""
        self.reports.append(report)
        self._update()

    def _update(self) -> None:
        # `blocked`: an answer of the request was replaced by output moderation.
        blocked = any(r["blocked"] for r in self.reports)
        for report in self.watchers:
            report["route_applied"], report["blocked"] = self.applied, blocked


_DIRECTIVE: ContextVar[RouteDirective | None] = ContextVar("mlpm_guard_llama_index_route", default=None)


@contextmanager
def directing(route: Route, verdict: Verdict, policy: Policy) -> Iterator[RouteDirective]:
    """Hand ``route`` to every guarded LLM call made inside the block (same thread or task).

    The LLM answers under ``policy`` forced to ``route``. Why the bare query decides and not the
    LLM's own verdict on the prompt it is given: that prompt is the engine's template around
    retrieved passages, which is not what request prototypes are fitted on (read as a request,
    plain declarative passages lean unsafe), while the passages themselves are the node
    postprocessor's job. The LLM's verdict is still reported.
    """
    directive = RouteDirective(route, verdict, policy.forced(route))
    with handing(directive):
        yield directive


@contextmanager
def handing(directive: RouteDirective) -> Iterator[None]:
    """Make ``directive`` the current request's inside the block (used again around each step
    of a response stream, whose LLM call LlamaIndex makes only when the stream is read)."""
    token = _DIRECTIVE.set(directive)
    try:
        yield
    finally:
        _DIRECTIVE.reset(token)


# Set while a program (structured_predict, a query transform) drives the LLM: its prompt is
# LlamaIndex's template around pipeline values, not the user's words, so it is not judged as input.
_PROGRAM: ContextVar[bool] = ContextVar("mlpm_guard_llama_index_program", default=False)


@contextmanager
def program() -> Iterator[None]:
    """Mark the LLM calls inside the block as a program's (answered on ``pass``; output moderation as usual)."""
    token = _PROGRAM.set(True)
    try:
        yield
    finally:
        _PROGRAM.reset(token)


def in_program() -> bool:
    return _PROGRAM.get()


def as_program(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (an LLM method, sync or async) with its LLM calls marked as a program's (:func:`program`)."""
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def run_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            with program():
                return await method(self, *args, **kwargs)

        return run_async

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with program():
            return method(self, *args, **kwargs)

    return run


def claim_directive() -> RouteDirective | None:
    """The current request's directive, marked as applied (``None`` outside a guarded engine)."""
    directive = _DIRECTIVE.get()
    return None if directive is None else directive.claim()


def result_report(result: GuardResult, *, routed_by_engine: bool) -> dict[str, Any]:
    """The report of a guarded LLM call: the answer, its decision record, and whether an engine chose its route."""
    return {"text": result.text, **result.decision("llm").to_dict(), "routed_by_engine": routed_by_engine}
