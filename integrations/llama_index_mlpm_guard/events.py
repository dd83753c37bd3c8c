"""Guard decisions as LlamaIndex instrumentation events.

Each piece dispatches its events inside its own span (the LLM's ``complete``/``chat``, the
engine's ``_query``, the postprocessor's ``_postprocess_nodes``), through a dispatcher under the
root one, so any event or span handler attached to the root dispatcher sees them::

    from llama_index.core.instrumentation import get_dispatcher
    get_dispatcher().add_event_handler(my_handler)   # my_handler.handle(event) gets them
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from llama_index.core.instrumentation.events import BaseEvent

from mlpm_guard import GuardResult, Route, Verdict, telemetry


class GuardDecisionEvent(BaseEvent):
    """One guard decision on a request.

    Attributes:
        stage: where it was taken: ``"query"`` (a guarded query engine, before retrieval),
            ``"chat"`` (a guarded chat engine) or ``"llm"`` (the guarded LLM, on its own prompt).
        route: ``pass``, ``safety_prompt``, ``steer`` or ``refuse``.
        blocked: the caller got the refusal message instead of a generated answer.
        p_unsafe / tier / category: the input verdict (``category`` as an S1-S14 code).
        output_flagged: the answer was flagged by output moderation (``"llm"`` stage only).
        routed_by_engine: the route was chosen by a guarded engine on the bare query.
        error: an internal error; the guard then failed closed (or open, if so configured).
        verdict: the full verdict as a dict (per-layer scores included).
    """

    stage: str
    route: str
    blocked: bool
    p_unsafe: Optional[float] = None
    tier: Optional[str] = None
    category: Optional[str] = None
    output_flagged: bool = False
    routed_by_engine: bool = False
    error: Optional[str] = None
    verdict: Optional[Dict[str, Any]] = None

    @classmethod
    def class_name(cls) -> str:
        return "GuardDecisionEvent"

    @classmethod
    def from_verdict(cls, stage: str, route: Route, verdict: Verdict, *, blocked: bool,
                     span_id: Optional[str] = None) -> GuardDecisionEvent:
        fields: dict[str, Any] = {"span_id": span_id} if span_id is not None else {}
        return cls(stage=stage, route=route.value, blocked=blocked, p_unsafe=verdict.p_unsafe,
                   tier=verdict.tier.value, category=verdict.category, error=verdict.error,
                   verdict=verdict.to_dict(), **fields)

    @classmethod
    def from_result(cls, result: GuardResult, *, routed_by_engine: bool,
                    span_id: Optional[str] = None) -> GuardDecisionEvent:
        v = result.verdict
        fields: dict[str, Any] = {"span_id": span_id} if span_id is not None else {}
        return cls(stage="llm", route=result.route.value, blocked=result.blocked,
                   p_unsafe=None if v is None else v.p_unsafe, tier=None if v is None else v.tier.value,
                   category=None if v is None else v.category, output_flagged=result.output_flagged,
                   routed_by_engine=routed_by_engine, error=result.error,
                   verdict=None if v is None else v.to_dict(), **fields)


def traced(event: GuardDecisionEvent, model: Optional[str] = None) -> GuardDecisionEvent:
    """The event, after putting its decision on an OpenTelemetry span (when ``opentelemetry-api`` is installed)."""
    telemetry.decision_span(event.stage, event.model_dump(), model=model, framework="llama_index")
    return event


class GuardNodesEvent(BaseEvent):
    """The guard's pass over a batch of retrieved nodes.

    Attributes:
        mode: ``"drop"`` or ``"flag"``.
        n_nodes / n_unsafe / n_dropped: nodes scored, judged unsafe, and removed.
        node_ids: ids of the unsafe nodes.
        verdicts: one verdict dict per scored node, in input order.
    """

    mode: str
    n_nodes: int
    n_unsafe: int
    n_dropped: int
    node_ids: List[str] = []
    verdicts: List[Dict[str, Any]] = []

    @classmethod
    def class_name(cls) -> str:
        return "GuardNodesEvent"
