"""OpenTelemetry spans for guard decisions, when ``opentelemetry-api`` is installed (the ``otel`` extra).

Without it every function here is a no-op, so the integrations call them unconditionally. Spans
follow the OpenTelemetry GenAI conventions where they have a name for a thing
(``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``) and use
``mlpm_guard.*`` for the decision itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from ..vocabulary.types import Decision

try:
    from opentelemetry import trace as _trace
except ImportError:  # the optional extra is not installed
    _trace = None

#: The keys of a decision record written on a span: every key of :class:`~mlpm_guard.Decision`
#: whose value is a scalar (the nested verdicts and timings stay in the record).
DECISION_ATTRIBUTES = tuple(k for k in Decision.KEYS if k not in ("verdict", "output_verdict", "timings"))


def enabled() -> bool:
    return _trace is not None


def decision_span(stage: str, decision: Decision | Mapping[str, Any], *, start_ns: int | None = None,
                  model: str | None = None, framework: str | None = None) -> None:
    """One finished span for a decision already taken (``start_ns``: when its check began)."""
    if _trace is None:
        return
    with guard_span(stage, model=model, framework=framework, start_ns=start_ns) as span:
        record(span, decision)


@contextlib.contextmanager
def guard_span(stage: str, *, model: str | None = None, framework: str | None = None,
               start_ns: int | None = None) -> Iterator[Any]:
    """A span around one guard check; ``record(span, decision)`` puts the decision on it.

    Yields the span (``None`` without OpenTelemetry).
    """
    if _trace is None:
        yield None
        return
    tracer = _trace.get_tracer("mlpm_guard")
    attributes = {"gen_ai.operation.name": "guardrail", "gen_ai.provider.name": "mlpm_guard", "mlpm_guard.stage": stage}
    if model:
        attributes["gen_ai.request.model"] = model
    if framework:
        attributes["mlpm_guard.framework"] = framework
    with tracer.start_as_current_span(f"mlpm_guard.check {stage}", attributes=attributes, start_time=start_ns) as span:
        yield span


def record(span: Any, decision: Decision | Mapping[str, Any]) -> None:
    """Write a decision record's scalar fields onto a span as ``mlpm_guard.*`` attributes."""
    if span is None:
        return
    if isinstance(decision, Decision):
        decision = decision.to_dict()
    for key in DECISION_ATTRIBUTES:
        value = decision.get(key)
        if isinstance(value, (str, bool, int, float)):
            span.set_attribute(f"mlpm_guard.{key}", value)
