"""Named policies: ``strict``, ``balanced`` and ``permissive``.

The three differ only in their lines and in where the middle tier goes; refusal texts, the safety
prompt, steering and output moderation keep the defaults. ``balanced`` is the default
:class:`~mlpm_guard.Policy` (the prototypes' own lines). ``strict`` refuses from P(unsafe) 0.3 and
answers under the safety prompt from 0.1, for deployments where a missed harmful request costs
more than an annoyed user. ``permissive`` refuses only from 0.9 and puts 0.6 to 0.9 under the
safety prompt, for the false-alarm complaint ("most of my ordinary prompts are blocked"): the
answering model then still sees the safety prompt on doubtful requests instead of a refusal.

To fit lines to your own traffic instead, see ``mlpm-guard calibrate``
(:meth:`~mlpm_guard.Policy.calibrated`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..vocabulary.errors import ConfigError
from ..vocabulary.types import Route
from .policy import Policy

__all__ = ["PRESETS", "policy_preset", "preset_name"]

_LINES: dict[str, dict[str, Any]] = {
    "strict": {"controversial_at": 0.1, "unsafe_at": 0.3, "controversial_route": Route.SAFETY_PROMPT,
               "unsafe_route": Route.REFUSE},
    "balanced": {},
    "permissive": {"controversial_at": 0.6, "unsafe_at": 0.9, "controversial_route": Route.SAFETY_PROMPT,
                   "unsafe_route": Route.REFUSE},
}

#: The preset names, strictest first.
PRESETS: tuple[str, ...] = tuple(_LINES)


def policy_preset(name: str, **overrides: Any) -> Policy:
    """The named policy, with any other :class:`~mlpm_guard.Policy` fields in ``overrides``."""
    if name not in _LINES:
        raise ConfigError(f"unknown policy preset {name!r}; the presets are {', '.join(PRESETS)}")
    return Policy.model_validate({**_LINES[name], **overrides})


def preset_name(policy: Policy) -> str | None:
    """The preset a policy equals, if any (what the decision log records as its policy)."""
    for name in PRESETS:
        if policy == _preset(name):
            return name
    return None


@lru_cache(maxsize=None)
def _preset(name: str) -> Policy:
    return policy_preset(name)
