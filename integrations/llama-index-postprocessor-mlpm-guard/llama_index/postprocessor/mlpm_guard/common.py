"""What every guarded LlamaIndex piece shares: the guard it serves and the report it attaches."""

from __future__ import annotations

from typing import Any, Optional

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseComponent

from mlpm_guard import Decision, Guard, Route, Verdict
from mlpm_guard.guardrail.binding import resolve_guard

#: The key under which every piece puts its guard report (response metadata, additional_kwargs).
METADATA_KEY = "mlpm_guard"


class GuardedComponent(BaseComponent):
    """A LlamaIndex component serving a guard: the one it was built with, or the shared default."""

    _guard: Optional[Guard] = PrivateAttr(default=None)

    def __init__(self, guard: Optional[Guard] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._guard = check_guard(guard, type(self).__name__)

    @property
    def guard(self) -> Guard:
        """The guard this component serves (the shared default is built here on first use)."""
        return resolve_guard(self._guard)


def check_guard(guard: Any, owner: str) -> Guard | None:
    """Validate a ``guard`` argument (``None`` means the shared default, resolved on first use)."""
    if guard is None or isinstance(guard, Guard):
        return guard
    msg = (f"`guard` of {owner} must be a mlpm_guard.Guard or None (the shared embedded default), "
           f"got {type(guard).__name__}; build one with `mlpm_guard.Guard(...)`")
    raise TypeError(msg)


def verdict_report(stage: str, route: Route, verdict: Verdict | None, *, blocked: bool,
                   **extra: Any) -> dict[str, Any]:
    """The machine-readable report a piece attaches to what it returns: the decision record and
    what only that piece knows (``extra``)."""
    return {**Decision(route, blocked=blocked, verdict=verdict, stage=stage).to_dict(), **extra}
