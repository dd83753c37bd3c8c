"""How an integration binds to the guard: which guard serves it, and the policy of one call.

Every LangChain adapter and LlamaIndex piece resolves its guard and its policy here, so a piece
built without a guard shares the process's default one (:func:`~mlpm_guard.default_guard`), and
thresholds set on a piece mean the same thing in both frameworks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from pydantic import ValidationError

from ..model.backbone import Backbone
from ..vocabulary.errors import ConfigError
from .defaults import default_guard
from .guard import Guard, as_policy
from .policy import Policy

__all__ = ["PolicyLike", "call_policy", "resolve_backbone", "resolve_guard"]

#: What a piece accepts as its policy: a ``Policy``, a dict of its fields, or a YAML/JSON path (``None``: the guard's).
PolicyLike = Union[Policy, Mapping[str, Any], str, Path, None]


def resolve_guard(guard: Guard | None) -> Guard:
    """``guard``, or the process's shared default guard when it is ``None`` (built on first use)."""
    return guard if guard is not None else default_guard()


def resolve_backbone(backbone: Backbone | None) -> Backbone:
    """``backbone``, or the shared default guard's when it is ``None``."""
    return backbone if backbone is not None else default_guard().backbone


def call_policy(guard: Guard, policy: PolicyLike = None, *, unsafe_at: float | None = None,
                controversial_at: float | None = None) -> Policy:
    """The policy of one call: the piece's own (or the guard's), with run-time thresholds on top.

    Raises:
        ConfigError: the thresholds do not fit the policy (each in (0, 1), ``controversial_at`` at
            most ``unsafe_at``).
    """
    base = guard.policy if policy is None else as_policy(policy)
    updates = {k: v for k, v in (("unsafe_at", unsafe_at), ("controversial_at", controversial_at)) if v is not None}
    if not updates:
        return base
    try:
        return Policy.model_validate({**base.model_dump(), **updates})
    except ValidationError as exc:
        msg = f"invalid thresholds {updates} for the guard policy; each must be in (0, 1) and " \
              f"`controversial_at` <= `unsafe_at`:\n{exc}"
        raise ConfigError(msg) from None
