"""Output moderation: scoring a generated answer, with the prototypes or any callable you plug in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .scoring import judge
from .types import Tier, Verdict


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


def to_verdict(result: Verdict | bool | float, threshold: float | None = None) -> Verdict:
    """Normalise a moderator's answer into a verdict (re-thresholded when ``threshold`` is given)."""
    if isinstance(result, Verdict):
        if threshold is None:
            return result
        p = result.p_unsafe
        tier = Tier.UNSAFE if p >= threshold else (Tier.SAFE if result.tier is Tier.SAFE else Tier.CONTROVERSIAL)
        return Verdict(p, "unsafe" if tier is Tier.UNSAFE else "safe", tier, result.category, result.category_name,
                       result.layer_scores, threshold, result.n_truncated_tokens, result.error)
    if isinstance(result, bool):
        p = 1.0 if result else 0.0
    elif isinstance(result, (int, float)):
        p = float(result)
    else:
        msg = f"a moderator must return a Verdict, a bool or a float, got {type(result).__name__}"
        raise TypeError(msg)
    t = 0.5 if threshold is None else threshold
    return Verdict(p, "unsafe" if p >= t else "safe", Tier.UNSAFE if p >= t else Tier.SAFE, threshold=t)
