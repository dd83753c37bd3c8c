"""The settings every adapter shares: which guard, which policy, and the run-time thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlpm_guard import Guard, Policy, as_policy
from mlpm_guard.guardrail.binding import call_policy, resolve_guard


class GuardSettings(BaseModel):
    """Pydantic fields mixed into each adapter.

    ``unsafe_at`` and ``controversial_at`` are plain fields so that
    ``configurable_fields(unsafe_at=ConfigurableField(id=...))`` can change them per run.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Guard | None = Field(default=None, description="the core guard; None: one default Guard() per process")
    policy: Policy | None = Field(default=None, description="replaces the guard's policy for this adapter")
    unsafe_at: float | None = Field(default=None, gt=0, lt=1, description="P(unsafe) of the unsafe tier")
    controversial_at: float | None = Field(default=None, gt=0, lt=1,
                                           description="P(unsafe) of the controversial tier")

    @field_validator("policy", mode="before")
    @classmethod
    def _read_policy(cls, value: Any) -> Policy | None:
        # A dict or a YAML/JSON path is read (and checked) once, at construction.
        if value is None or isinstance(value, Policy):
            return value
        if isinstance(value, (dict, str, Path)):
            return as_policy(value)
        msg = f"`policy` must be a Policy, a dict of its fields or a YAML/JSON path, got {type(value).__name__}"
        raise ValueError(msg)

    def resolved_guard(self) -> Guard:
        """This adapter's guard, or the shared default one (loaded on first use)."""
        return resolve_guard(self.guard)

    def call_policy(self, guard: Guard) -> Policy:
        """The policy of a call, built from the fields as they are for this run."""
        return call_policy(guard, self.policy, unsafe_at=self.unsafe_at, controversial_at=self.controversial_at)
