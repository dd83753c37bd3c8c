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

from mlpm_guard import Decision, GuardResult, Route, Verdict
from mlpm_guard.guardrail import telemetry


class GuardDecisionEvent(BaseEvent):
    """One guard decision on a request: the fields of the decision record
    (:class:`mlpm_guard.Decision`), plus ``routed_by_engine``.

    Attributes:
        stage: where it was taken: ``"query"`` (a guarded query engine, before retrieval),
            ``"chat"`` (a guarded chat engine) or ``"llm"`` (the guarded LLM, on its own prompt).
        route / applied_route: ``pass``, ``safety_prompt``, ``steer`` or ``refuse``.
        blocked: the caller got the refusal message instead of a generated answer.
        p_unsafe / tier / category / category_name / threshold / view: the input verdict
            (``category`` as an S1-S14 code).
        error: an internal error; the guard then failed closed (or open, if so configured).
        verdict: the full verdict as a dict (per-layer scores included).
        output_flagged / output_p_unsafe / output_category / output_verdict: output moderation
            (``"llm"`` stage only).
        replaced: the flagged answer was replaced by the refusal message.
        timings: where the time went (``"llm"`` stage only).
        routed_by_engine: the route was chosen by a guarded engine on the bare query.
    """

    stage: str
    route: str
    applied_route: Optional[str] = None
    blocked: bool
    p_unsafe: Optional[float] = None
    tier: Optional[str] = None
    category: Optional[str] = None
    category_name: Optional[str] = None
    threshold: Optional[float] = None
    view: Optional[str] = None
    error: Optional[str] = None
    verdict: Optional[Dict[str, Any]] = None
    output_flagged: bool = False
    output_p_unsafe: Optional[float] = None
    output_category: Optional[str] = None
    output_verdict: Optional[Dict[str, Any]] = None
    replaced: bool = False
    timings: Optional[Dict[str, Any]] = None
    routed_by_engine: bool = False

    @classmethod
    def class_name(cls) -> str:
        return "GuardDecisionEvent"

    @classmethod
    def from_decision(cls, decision: Decision, *, routed_by_engine: bool = False,
                      span_id: Optional[str] = None) -> GuardDecisionEvent:
        fields: dict[str, Any] = {"span_id": span_id} if span_id is not None else {}
        return cls(**decision.to_dict(), routed_by_engine=routed_by_engine, **fields)

    @classmethod
    def from_verdict(cls, stage: str, route: Route, verdict: Verdict, *, blocked: bool,
                     span_id: Optional[str] = None) -> GuardDecisionEvent:
        return cls.from_decision(Decision(route, blocked=blocked, verdict=verdict, stage=stage), span_id=span_id)

    @classmethod
    def from_result(cls, result: GuardResult, *, routed_by_engine: bool,
                    span_id: Optional[str] = None) -> GuardDecisionEvent:
        return cls.from_decision(result.decision("llm"), routed_by_engine=routed_by_engine, span_id=span_id)

    def record(self) -> dict[str, Any]:
        """The decision record this event carries (the keys of :meth:`mlpm_guard.Decision.to_dict`)."""
        return {key: getattr(self, key) for key in Decision.KEYS}


def traced(event: GuardDecisionEvent, model: Optional[str] = None) -> GuardDecisionEvent:
    """The event, after putting its decision on an OpenTelemetry span (when ``opentelemetry-api`` is installed)."""
    telemetry.decision_span(event.stage, event.record(), model=model, framework="llama_index")
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
