"""What an adapter does for a model the guard does not host: the decisions, written once.

The guard's own answers take every route on its backbone (``pipeline.Stages.start``). An adapter
in front of another model (the HTTP proxy, LangChain's guarded runnable and agent middleware)
can refuse, add the safety prompt as a system message, or forward the request as it came; it
cannot steer, since it has no access to that model's activations, so ``STEER`` is applied as the
closest route it can take, the safety prompt. The adapters translate these decisions into their
framework's types and hold no decision of their own.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..vocabulary.types import Decision, Route, Verdict

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["answered", "applied_route", "decide", "replaces"]


def applied_route(route: Route) -> Route:
    """What a model the guard does not host can be given for ``route``: ``STEER`` becomes ``SAFETY_PROMPT``."""
    return Route.SAFETY_PROMPT if route is Route.STEER else route


def decide(verdict: Verdict, policy: Policy) -> Decision:
    """The input decision for an external model: the policy's route, what is applied, and whether
    the request is refused (nothing goes to the model) or forwarded (with the safety prompt when
    the applied route is ``SAFETY_PROMPT``)."""
    route = policy.route(verdict)
    applied = applied_route(route)
    return Decision(route, blocked=applied is Route.REFUSE, verdict=verdict, applied_route=applied)


def replaces(output: Verdict | None, policy: Policy) -> bool:
    """Whether an answer judged ``output`` is replaced by the refusal (else it is only flagged):
    it is, when flagged and the policy's ``output_moderation.on_flag`` is ``"replace"``."""
    return output is not None and output.unsafe and policy.output_moderation.on_flag == "replace"


def answered(decision: Decision, output: Verdict | None, policy: Policy, *, broken: bool = False,
             stage: str | None = None) -> Decision:
    """``decision`` once the answer was judged (``output``; ``None`` when it was not) or its stream
    broke (``broken``), which ends as a refusal like a replaced answer.

    ``stage``: the stage the new record reports (by default the one ``decision`` had).
    """
    replaced = broken or replaces(output, policy)
    return dataclasses.replace(decision, output_verdict=output, replaced=replaced,
                               blocked=decision.blocked or replaced, stage=stage or decision.stage)
