"""Calibrating a policy to logged traffic: the lines that would have flagged at most a chosen share
of what the guard really saw, and what they would have changed.

The decision log's scored requests stand for ordinary traffic (the operator's premise: most of
it is benign); requests a reviewer marked harmful are left out. :meth:`Policy.calibrated` places
the lines; this module reads the log, replays every logged verdict through the current policy,
the proposed one and the presets, and reports the differences.
"""

from __future__ import annotations

import time
from collections import Counter

from pydantic import BaseModel, ConfigDict

from ..vocabulary.errors import ConfigError
from ..vocabulary.types import Route, Tier, Verdict
from .decision_log import DecisionFilter, DecisionLog, LoggedDecision
from .policy import Policy
from .presets import PRESETS, policy_preset

__all__ = ["CalibrationReport", "calibrate_from_log", "replay"]


class CalibrationReport(BaseModel):
    """What calibrating to a log proposes.

    Attributes:
        policy: the proposed policy (the starting policy with new ``unsafe_at`` / ``controversial_at``).
        n_decisions: logged requests it was fitted on.
        n_excluded: logged requests left out because a reviewer marked their text harmful.
        routes_now / routes_proposed: how many of those requests take each route.
        changes: ``"refuse -> safety_prompt"`` style counts of the routes that would change.
        presets: each preset's share of requests not passed on the same traffic.
    """

    model_config = ConfigDict(frozen=True)

    policy: Policy
    n_decisions: int
    n_excluded: int
    max_flag_rate: float
    routes_now: dict[str, int]
    routes_proposed: dict[str, int]
    changes: dict[str, int]
    presets: dict[str, float]

    def rate(self, routes: dict[str, int], *, refused_only: bool = True) -> float:
        flagged = routes.get("refuse", 0) if refused_only else sum(v for k, v in routes.items() if k != "pass")
        return flagged / self.n_decisions if self.n_decisions else 0.0

    def text(self) -> str:
        p = self.policy
        lines = [f"{self.n_decisions} logged requests ({self.n_excluded} marked harmful left out)",
                 f"proposed lines: refuse from P(unsafe) {p.unsafe_at:.4f}, safety prompt from {p.controversial_at:.4f}",
                 f"refused: {self.rate(self.routes_now):.1%} now, {self.rate(self.routes_proposed):.1%} proposed "
                 f"(at most {self.max_flag_rate:.1%})",
                 f"not passed: {self.rate(self.routes_now, refused_only=False):.1%} now, "
                 f"{self.rate(self.routes_proposed, refused_only=False):.1%} proposed"]
        lines += [f"  {change}: {n}" for change, n in sorted(self.changes.items(), key=lambda kv: -kv[1])]
        lines.append("presets (share not passed): " + ", ".join(f"{k} {v:.1%}" for k, v in self.presets.items()))
        return "\n".join(lines)


def replay(row: LoggedDecision, policy: Policy) -> Route:
    """The route ``policy`` gives a logged request (its verdict rebuilt from the logged fields)."""
    tier = Tier(row.tier) if row.tier else Tier.SAFE
    verdict = Verdict(float(row.p_unsafe or 0.0), "unsafe" if tier is Tier.UNSAFE else "safe", tier, row.category,
                      error=row.error)
    return policy.route(verdict)


def calibrate_from_log(log: DecisionLog | str, policy: Policy, *, max_flag_rate: float,
                       max_controversial_rate: float | None = None, hours: float | None = None) -> CalibrationReport:
    """Propose lines from the requests in ``log`` (a log, or its URL / SQLite path); see the module docstring."""
    owned = not isinstance(log, DecisionLog)
    db = DecisionLog(log) if owned else log
    try:
        since = time.time() - hours * 3600 if hours else None
        rows = [r for r in db.decisions(DecisionFilter(kind="request", since=since, limit=100_000))
                if r.p_unsafe is not None and r.error is None]
        harmful = {c.text_sha256 for c in db.corrections() if c.label == "unsafe"}
    finally:
        if owned:
            db.close()
    kept = [r for r in rows if r.text_sha256 not in harmful]
    if not kept:
        raise ConfigError("the decision log holds no scored requests to calibrate on"
                          + (f" in the last {hours:g} hours" if hours else ""))
    proposed = policy.calibrated([r.p_unsafe for r in kept], max_flag_rate=max_flag_rate,  # type: ignore[misc]
                                 max_controversial_rate=max_controversial_rate)
    now = [replay(r, policy) for r in kept]
    new = [replay(r, proposed) for r in kept]
    presets = {}
    for name in PRESETS:
        preset = policy_preset(name)
        presets[name] = sum(replay(r, preset) is not Route.PASS for r in kept) / len(kept)
    return CalibrationReport(
        policy=proposed, n_decisions=len(kept), n_excluded=len(rows) - len(kept), max_flag_rate=max_flag_rate,
        routes_now=dict(Counter(r.value for r in now)), routes_proposed=dict(Counter(r.value for r in new)),
        changes=dict(Counter(f"{a.value} -> {b.value}" for a, b in zip(now, new) if a is not b)), presets=presets)
