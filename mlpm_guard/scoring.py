"""Scoring a request's views on the backbone: the strictest verdict, every view in shared batches.

:mod:`.views` says what a request or a text is read as; this module runs those readings through the
backbone and the prototypes. The guard (prompts and retrieved content) and the default output
moderator (answers, as content) both score here, so there is one way to judge text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import InputError
from .messages import clean_text, to_messages
from .types import Verdict
from .views import View, content_views, request_views


def token_counter(backbone: Any) -> Callable[[list[dict[str, str]]], int]:
    """Tokens a message list takes through the backbone's chat template (what the views budget)."""
    def count(messages: list[dict[str, str]]) -> int:
        return len(backbone.encode([messages])[0])

    return count


def views_of(backbone: Any, item: Any, *, content: bool = False) -> list[View]:
    """The readings of a request (a string or message list), or of a text judged as content."""
    if content:
        if not isinstance(item, str):
            raise InputError(f"content to check must be a str, got {type(item).__name__}")
        return content_views(clean_text(item), token_counter(backbone))
    return request_views(to_messages(item), token_counter(backbone))


def judge(backbone: Any, prototypes: Any, items: Sequence[Any], *, content: bool = False,
          prefilled: np.ndarray | None = None, prefilled_rows: Sequence[Any] | None = None) -> list[Verdict]:
    """The strictest verdict over each item's views (``verdict.view`` names the one that decided).

    Args:
        items: message lists (or strings) of requests; with ``content``, texts.
        prefilled: states already captured for the whole of each request (the prefill that ``PASS``
            continues from); a view equal to the whole request reuses them instead of a forward pass.
        prefilled_rows: the encoded rows of that prefill (for the truncation count).
    """
    plan: list[list[tuple[str, int, bool]]] = []
    extra: list[list[dict[str, str]]] = []
    for i, item in enumerate(items):
        whole = None if content else to_messages(item)
        entries = []
        for view in views_of(backbone, item, content=content):
            if prefilled is not None and view.as_messages() == whole:
                entries.append((view.name, i, True))
            else:
                entries.append((view.name, len(extra), False))
                extra.append(view.as_messages())
        plan.append(entries)
    scored: list[Verdict] = []
    if extra:
        rows = backbone.encode(extra)
        states = backbone.last_token_states(rows, prototypes.layer_ids_)
        scored = prototypes.verdicts(states, n_truncated=[r.n_truncated for r in rows])
    pre: list[Verdict] = []
    if prefilled is not None:
        cut = [r.n_truncated for r in prefilled_rows] if prefilled_rows else None
        pre = prototypes.verdicts(prefilled, n_truncated=cut)
    out = []
    for entries in plan:
        candidates = [((pre if reused else scored)[k], name) for name, k, reused in entries]
        verdict, name = max(candidates, key=lambda c: c[0].p_unsafe)
        out.append(dataclasses.replace(verdict, view=name))
    return out
