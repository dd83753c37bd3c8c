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
    """

    p_unsafe: float
    label: str
    tier: Tier
    category: str | None = None
    category_name: str | None = None
    layer_scores: Mapping[int, float] = field(default_factory=dict)
    threshold: float = 0.5
    n_truncated_tokens: int = 0

    @property
    def unsafe(self) -> bool:
        return self.label == "unsafe"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tier"] = self.tier.value
        out["layer_scores"] = {str(k): v for k, v in self.layer_scores.items()}
        return out
