"""Output moderation: scoring a generated answer, with the prototypes or any callable you plug in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .scoring import judge
from .types import Verdict
from .verdicts import to_verdict

__all__ = ["Moderator", "PrototypeModerator", "to_verdict"]  # to_verdict: where callers found it first


@runtime_checkable
class Moderator(Protocol):
    """Anything that judges a response: returns a :class:`Verdict`, a bool (True = unsafe) or P(unsafe)."""

    def __call__(self, messages: list[dict[str, str]], response: str) -> Verdict | bool | float: ...


class PrototypeModerator:
    """Judges the response as content with the same prototypes that score prompts.

    The answer is read the way :meth:`mlpm_guard.Guard.check_content` reads a passage (inside a
    request for it, whole and in windows of a few sentences), so a harmful paragraph in a long
    answer is not averaged away.
    """

    def __init__(self, prototypes: Any, threshold: float | None = None) -> None:
        self.prototypes = prototypes
        self.threshold = threshold

    def __call__(self, messages: list[dict[str, str]], response: str) -> Verdict:
        return self.batch([response])[0]

    def batch(self, responses: Sequence[str]) -> list[Verdict]:
        verdicts = judge(self.prototypes.backbone, self.prototypes, [r if r.strip() else " " for r in responses],
                         content=True)
        return [to_verdict(v, self.threshold) for v in verdicts]

