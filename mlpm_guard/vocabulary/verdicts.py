"""Verdicts and tiers, built in one place.

Every verdict the guard hands out comes from here: the prototypes' own, one moved to another tier
(by a policy's thresholds: :func:`mlpm_guard.guardrail.policy.under_policy`), an output moderator's answer,
and the verdict of a text that could not be scored. So a tier always means the same comparison with two thresholds, the label always follows
the tier (``unsafe`` exactly in the unsafe tier), and a category is named only outside the safe tier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .categories import category_name
from .types import Tier, Verdict

__all__ = ["failed_verdict", "make_verdict", "retiered", "tier_of", "to_verdict"]


def tier_of(p_unsafe: float, unsafe_at: float, controversial_at: float) -> Tier:
    """The tier of a probability: unsafe from ``unsafe_at``, controversial from ``controversial_at``.

    A NaN reaches neither threshold and lands in the safe tier: callers that can see NaN fail it
    closed first (:func:`failed_verdict`).
    """
    if p_unsafe >= unsafe_at:
        return Tier.UNSAFE
    return Tier.CONTROVERSIAL if p_unsafe >= controversial_at else Tier.SAFE


def make_verdict(p_unsafe: float, tier: Tier, *, threshold: float, category: str | None = None,
                 layer_scores: Mapping[int | str, float] | None = None, n_truncated_tokens: int = 0,
                 error: str | None = None, view: str | None = None) -> Verdict:
    """A verdict whose label follows ``tier`` and whose ``category`` is dropped in the safe tier."""
    category = category if tier is not Tier.SAFE else None
    return Verdict(float(p_unsafe), "unsafe" if tier is Tier.UNSAFE else "safe", tier, category,
                   category_name(category), dict(layer_scores or {}), threshold, n_truncated_tokens, error, view)


def retiered(verdict: Verdict, tier: Tier, threshold: float) -> Verdict:
    """``verdict`` moved to ``tier``, decided at ``threshold`` (its scores, view and error kept)."""
    return make_verdict(verdict.p_unsafe, tier, threshold=threshold, category=verdict.category,
                        layer_scores=verdict.layer_scores, n_truncated_tokens=verdict.n_truncated_tokens,
                        error=verdict.error, view=verdict.view)


def failed_verdict(error: str, *, fail_open: bool = False, threshold: float = 0.5,
                   n_truncated_tokens: int = 0) -> Verdict:
    """The verdict of a text that could not be scored: unsafe (fail closed) or, failing open, safe.

    The error is recorded either way; :meth:`~mlpm_guard.Policy.route` refuses an unsafe verdict
    that carries one whatever the routes say.
    """
    tier = Tier.SAFE if fail_open else Tier.UNSAFE
    return make_verdict(0.0 if fail_open else 1.0, tier, threshold=threshold, n_truncated_tokens=n_truncated_tokens,
                        error=error)


def to_verdict(result: Verdict | bool | float, threshold: float | None = None) -> Verdict:
    """Normalise a moderator's answer into a verdict (re-thresholded when ``threshold`` is given).

    A bool is P(unsafe) 1 or 0. A probability has no controversial band: it is unsafe from
    ``threshold`` (0.5 if none) and safe below. A verdict moved by ``threshold`` keeps its own
    controversial band below it: it is safe only if it was safe.
    """
    if isinstance(result, Verdict):
        if threshold is None:
            return result
        p = result.p_unsafe
        tier = Tier.UNSAFE if p >= threshold else (Tier.SAFE if result.tier is Tier.SAFE else Tier.CONTROVERSIAL)
        return retiered(result, tier, threshold)
    if isinstance(result, bool):
        p = 1.0 if result else 0.0
    elif isinstance(result, (int, float)):
        p = float(result)
    else:
        msg = f"a moderator must return a Verdict, a bool or a float, got {type(result).__name__}"
        raise TypeError(msg)
    t = 0.5 if threshold is None else threshold
    if not math.isfinite(p):  # NaN reaches no threshold and would pass as safe
        return failed_verdict(f"ModerationError: the moderator returned {p!r}", threshold=t)
    return make_verdict(p, tier_of(p, t, t), threshold=t)
