"""The small result vocabulary shared by every stage: tiers, routes, verdicts."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping


class Tier(str, enum.Enum):
    """Three-tier severity of a verdict (the Llama Guard / MLCommons style)."""

    SAFE = "safe"
    CONTROVERSIAL = "controversial"
    UNSAFE = "unsafe"

    def __str__(self) -> str:  # so f-strings and JSON show the plain value
        return self.value


class Route(str, enum.Enum):
    """What the guard does with a request, mildest first."""

    PASS = "pass"
    SAFETY_PROMPT = "safety_prompt"
    STEER = "steer"
    REFUSE = "refuse"

    @property
    def severity(self) -> int:
        return list(Route).index(self)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Verdict:
    """What the prototypes say about one text.

    Attributes:
        p_unsafe: probability that the text is unsafe, in [0, 1].
        label: ``"unsafe"`` when ``p_unsafe`` reaches the decision threshold, else ``"safe"``.
        tier: severity tier (safe / controversial / unsafe) from the prototypes' two thresholds.
        category: hazard code (``"S1"`` … ``"S14"``) of the nearest unsafe category, or the
            dataset's own category name when it does not map; ``None`` when the text is safe
            or no category prototypes were fitted.
        category_name: readable name of ``category``.
        layer_scores: per-layer P(unsafe) of the layers the combination uses, keyed by layer id.
        threshold: decision threshold that produced ``label``.
        n_truncated_tokens: tokens dropped from the middle of an over-long prompt (0 if none).
        error: set when the text could not be scored; the verdict is then unsafe (fail closed).
        view: which reading of the request gave this (strictest) score: ``"message"``,
            ``"conversation"``, ``"latest user turn"``, ``"sentence N"``, ``"content"`` or
            ``"passage N"`` (see :mod:`mlpm_guard.views`); ``None`` for a directly scored text.
    """

    p_unsafe: float
    label: str
    tier: Tier
    category: str | None = None
    category_name: str | None = None
    layer_scores: Mapping[int, float] = field(default_factory=dict)
    threshold: float = 0.5
    n_truncated_tokens: int = 0
    error: str | None = None
    view: str | None = None

    @property
    def unsafe(self) -> bool:
        return self.label == "unsafe"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tier"] = self.tier.value
        out["layer_scores"] = {str(k): v for k, v in self.layer_scores.items()}
        return out


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in milliseconds, and how many tokens it read and wrote."""

    scoring_ms: float = 0.0
    generation_ms: float = 0.0
    moderation_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_ms(self) -> float:
        return self.scoring_ms + self.generation_ms + self.moderation_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_ms": self.total_ms}


@dataclass(frozen=True)
class GuardResult:
    """The outcome of one guarded request.

    Attributes:
        text: the answer (the refusal message when refused or replaced).
        route: the route the input verdict took.
        verdict: the input verdict (``None`` only if scoring itself failed).
        output_verdict: the output moderation verdict, when output moderation ran.
        output_flagged: the output was judged unsafe.
        replaced: the flagged output was replaced by the refusal message (policy ``on_flag="replace"``).
        timings: time and token counts.
        error: an internal error, recorded when the guard failed closed (or open, if so configured).
    """

    text: str
    route: Route
    verdict: Verdict | None
    output_verdict: Verdict | None = None
    output_flagged: bool = False
    replaced: bool = False
    timings: Timings = field(default_factory=Timings)
    error: str | None = None

    @property
    def p_unsafe(self) -> float | None:
        return None if self.verdict is None else self.verdict.p_unsafe

    @property
    def blocked(self) -> bool:
        """True when the caller did not get a generated answer: refused, or replaced after output moderation."""
        return self.route is Route.REFUSE or self.replaced

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "route": self.route.value,
            "p_unsafe": self.p_unsafe,
            "verdict": self.verdict.to_dict() if self.verdict else None,
            "output_flagged": self.output_flagged,
            "replaced": self.replaced,
            "blocked": self.blocked,
            "output_verdict": self.output_verdict.to_dict() if self.output_verdict else None,
            "timings": self.timings.to_dict(),
            "error": self.error,
        }


@dataclass(frozen=True)
class GuardChunk:
    """One piece of a streamed answer; the last chunk of a stream carries the full ``result``."""

    text: str
    result: GuardResult | None = None
