"""The small result vocabulary shared by every stage: tiers, routes, verdicts, decisions."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping


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
        layer_scores: P(unsafe) of each reading the combination uses, keyed by layer id for a
            last-token reading and ``"mean <layer>"`` for a mean-pooled one (:mod:`mlpm_guard.estimator.readings`).
        threshold: decision threshold that produced ``label``.
        n_truncated_tokens: tokens dropped from the middle of an over-long prompt (0 if none).
        error: set when the text could not be scored; the verdict is then unsafe (fail closed).
        view: which reading of the request gave this (strictest) score: ``"message"``,
            ``"conversation"``, ``"latest user turn"``, ``"user turns"``, ``"sentence N"``, ``"content"`` or
            ``"passage N"`` (see :mod:`mlpm_guard.guardrail.views`); ``None`` for a directly scored text.
    """

    p_unsafe: float
    label: str
    tier: Tier
    category: str | None = None
    category_name: str | None = None
    layer_scores: Mapping[int | str, float] = field(default_factory=dict)
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """The verdict :meth:`to_dict` wrote."""
        return cls(float(data["p_unsafe"]), data["label"], Tier(data["tier"]), data.get("category"),
                   data.get("category_name"), {_reading_key(k): float(v) for k, v in (data.get("layer_scores") or {}).items()},
                   float(data.get("threshold", 0.5)), int(data.get("n_truncated_tokens", 0)), data.get("error"),
                   data.get("view"))

    def summary(self) -> dict[str, Any]:
        """The headline fields, flat (no per-layer scores): what traces and metadata show of a verdict."""
        return {"p_unsafe": float(self.p_unsafe), "tier": self.tier.value, "category": self.category,
                "category_name": self.category_name, "threshold": self.threshold, "view": self.view,
                "error": self.error}


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timings:
        """The timings :meth:`to_dict` wrote (``total_ms`` is derived, so it is not read)."""
        return cls(**{k: data[k] for k in ("scoring_ms", "generation_ms", "moderation_ms", "prompt_tokens",
                                           "completion_tokens") if k in data})


_NO_VERDICT = dict.fromkeys(("p_unsafe", "tier", "category", "category_name", "threshold", "view", "error"))


@dataclass(frozen=True)
class Decision:
    """What the guard decided on one request at one stage: the record every surface reports.

    :meth:`to_dict` is what users see wherever a decision goes out: LangChain message metadata,
    custom events and traces, LlamaIndex response metadata and instrumentation events,
    OpenTelemetry span attributes, the HTTP server's ``mlpm_guard`` field and
    :meth:`GuardResult.to_dict`. A surface may add keys only it knows (``docs/decisions.md``
    lists them); it never renames or drops these.

    Attributes:
        route: the policy's route for the input verdict.
        blocked: the caller got no generated answer (refused, or replaced after output moderation).
        verdict: the input verdict (``None`` when there is none: scoring failed, or the stage
            judged an answer alone).
        stage: where the decision was taken: ``"input"``, ``"output"`` and ``"tool"`` (LangChain),
            ``"query"``, ``"chat"`` and ``"llm"`` (LlamaIndex).
        applied_route: what was done, when it differs from ``route`` (``STEER`` on an external
            model is applied as ``SAFETY_PROMPT``); defaults to ``route``.
        output_verdict: the output moderation verdict, when it ran.
        replaced: the flagged answer was replaced by the refusal message.
        error: what went wrong, if anything (the guard then failed closed, or open if the policy
            says so); defaults to the input verdict's error.
        timings: where the time went, when the guard itself answered.
    """

    #: The keys of :meth:`to_dict`, in order.
    KEYS: ClassVar[tuple[str, ...]] = (
        "stage", "route", "applied_route", "blocked", "p_unsafe", "tier", "category", "category_name", "threshold",
        "view", "error", "verdict", "output_flagged", "output_p_unsafe", "output_category", "output_verdict",
        "replaced", "timings")

    route: Route
    blocked: bool
    verdict: Verdict | None = None
    stage: str = "input"
    applied_route: Route | None = None
    output_verdict: Verdict | None = None
    replaced: bool = False
    error: str | None = None
    timings: Timings | None = None

    def __post_init__(self) -> None:
        # Defaults filled in here, so a record read back with `from_dict` equals the original.
        object.__setattr__(self, "route", Route(self.route))
        object.__setattr__(self, "applied_route", Route(self.applied_route or self.route))
        if self.error is None and self.verdict is not None:
            object.__setattr__(self, "error", self.verdict.error)

    @property
    def output_flagged(self) -> bool:
        return self.output_verdict is not None and self.output_verdict.unsafe

    def to_dict(self, *, redact_errors: bool = False) -> dict[str, Any]:
        """The record as plain JSON-ready values, keys :attr:`KEYS`.

        Args:
            redact_errors: cut error texts to their kind (``"ScoringError: ..."`` -> ``"ScoringError"``),
                for records that leave the process (the HTTP server): the text may quote internals.
        """
        v, o = self.verdict, self.output_verdict
        flat = v.summary() if v is not None else dict(_NO_VERDICT)
        flat["error"] = self.error  # the request's error (the verdict's, unless something later failed)
        applied = self.applied_route or self.route
        out = {"stage": self.stage, "route": self.route.value, "applied_route": applied.value,
               "blocked": self.blocked, **flat, "verdict": v.to_dict() if v is not None else None,
               "output_flagged": self.output_flagged,
               "output_p_unsafe": float(o.p_unsafe) if o is not None else None,
               "output_category": o.category if o is not None else None,
               "output_verdict": o.to_dict() if o is not None else None, "replaced": self.replaced,
               "timings": self.timings.to_dict() if self.timings is not None else None}
        if redact_errors:
            out["error"] = _error_kind(out["error"])
            for key in ("verdict", "output_verdict"):
                if out[key] is not None:
                    out[key]["error"] = _error_kind(out[key]["error"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """The decision a :meth:`to_dict` record describes (keys a surface added are ignored)."""
        def verdict(key: str) -> Verdict | None:
            return Verdict.from_dict(data[key]) if data.get(key) else None

        return cls(Route(data["route"]), bool(data["blocked"]), verdict("verdict"), data.get("stage", "input"),
                   Route(data.get("applied_route") or data["route"]), verdict("output_verdict"),
                   bool(data.get("replaced", False)), data.get("error"),
                   Timings.from_dict(data["timings"]) if data.get("timings") else None)


def _error_kind(error: str | None) -> str | None:
    return None if error is None else error.split(":", 1)[0].strip() or "error"


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

    def decision(self, stage: str = "input") -> Decision:
        """The decision record of this result."""
        return Decision(self.route, blocked=self.blocked, verdict=self.verdict, stage=stage,
                        output_verdict=self.output_verdict, replaced=self.replaced, error=self.error,
                        timings=self.timings)

    def to_dict(self) -> dict[str, Any]:
        """The answer ``text`` and the :class:`Decision` record's keys."""
        return {"text": self.text, **self.decision().to_dict()}


@dataclass(frozen=True)
class GuardChunk:
    """One piece of a streamed answer; the last chunk of a stream carries the full ``result``."""

    text: str
    result: GuardResult | None = None


def _reading_key(key: str) -> int | str:
    """A ``layer_scores`` key as :meth:`Verdict.to_dict` wrote it: a layer id, or ``"mean <layer>"``."""
    return int(key) if str(key).isdigit() else str(key)
