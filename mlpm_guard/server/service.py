"""What the proxy and the review page need of the app's service: the guard, the settings, the
scoring lanes and the metrics, as a protocol (the app's ``GuardService`` is the one implementation,
and the app builds the proxy and the review page, so they cannot import it)."""

from __future__ import annotations

from typing import Protocol

from ..guardrail.guard import Guard
from ..vocabulary.types import Route, Verdict
from .batching import Messages
from .settings import ServerSettings


class Service(Protocol):
    """The state behind the routes, as the proxy and the review page use it."""

    guard: Guard
    settings: ServerSettings

    async def score(self, messages: Messages) -> Verdict:
        """One prompt's verdict through the scoring lane; internal errors fail closed."""
        ...

    async def score_answer(self, messages: Messages, text: str) -> Verdict:
        """An answer's verdict in the conversation it answers, through the answer lane."""
        ...

    def record(self, route: Route, verdict: Verdict | None, output: Verdict | None = None) -> None:
        """Count a decision in the metrics."""
        ...
