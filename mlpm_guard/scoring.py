"""Scoring a request's views on the backbone: the strictest verdict, every view in shared batches.

:mod:`.views` says what a request or a text is read as; this module runs those readings through the
backbone and the prototypes. The guard (prompts and retrieved content) and the default output
moderator (answers, as content) both score here, so there is one way to judge text.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .encoding import Encoded
from .errors import InputError
from .language import is_other_language
from .messages import clean_text, to_messages
from .prototypes import check_line
from .types import Verdict
from .verdicts import make_verdict, tier_of
from .views import SENTENCE_VIEW, View, content_views, request_views

MessagesKey = tuple[tuple[str, str], ...]

#: Below this, a whole reading of a request is confidently safe: a single sentence then refuses it
#: only when confidently unsafe on its own (:func:`strictest`).
WHOLE_SAFE = 0.2


def _key(messages: Sequence[dict[str, str]]) -> MessagesKey:
    return tuple((m["role"], m["content"]) for m in messages)


def token_counter(backbone: Any, known: dict[MessagesKey, int] | None = None) -> Callable[[list[dict[str, str]]], int]:
    """Tokens a message list takes through the backbone's chat template (what the views budget).

    ``known`` holds counts already paid for (a request encoded for its prefill): the common
    single-message request is then never encoded again to be counted.
    """
    counts = dict(known or {})

    def count(messages: list[dict[str, str]]) -> int:
        key = _key(messages)
        if key not in counts:
            counts[key] = len(backbone.encode([messages])[0])
        return counts[key]

    return count


def views_of(backbone: Any, item: Any, *, content: bool = False, row: Encoded | None = None) -> list[View]:
    """The readings of a request (a string or message list), or of a text judged as content.

    ``row``: the request already encoded whole (its length is reused, not computed again).
    """
    if content:
        if not isinstance(item, str):
            raise InputError(f"content to check must be a str, got {type(item).__name__}")
        return content_views(clean_text(item), token_counter(backbone))
    messages = to_messages(item)
    return request_views(messages, token_counter(backbone, {_key(messages): len(row)} if row is not None else None))


def strictest(readings: Sequence[tuple[str, float]], *, threshold: float, controversial: float) -> tuple[int, float]:
    """Which reading of a request decides, and the P(unsafe) it counts with.

    The strictest reading wins, with two exceptions, both for sentences read alone, out of their
    message, when a whole reading (the message, the conversation, the latest turn) disagrees:

    - The last sentence of a message is usually its request; an earlier sentence is its context (a
      problem statement, background, a pasted log) and is weak evidence. Unless a whole reading is
      already at least controversial, such a sentence's log-odds are lowered so that it reaches
      ``threshold`` only at ``(1 + threshold) / 2`` (0.9 for the shipped 0.8). Held out of the fit,
      benign security questions were refused 11% of the time (mostly by one such sentence) and 5%
      with this rule, with no change for harmful requests behind a friendly or unrelated opening.
    - When every whole reading is confidently safe (below :data:`WHOLE_SAFE`, and below
      ``controversial`` like every discount here: a policy whose controversial line lies under
      :data:`WHOLE_SAFE` moves this gate down with it), the last sentence is discounted the same
      way, but only down to the safety prompt: it refuses only when confidently unsafe on its own (a
      harmful request behind an unrelated question still is), and below that it takes the
      safety-prompt route if it would alone, never ``PASS``. A maths problem's last question read
      alone ("How much will Bill spend for health insurance in a year?": 0.83, the whole problem
      0.10 under one held-out fit) refused gsm8k prompts. Held out of the fit, flagged gsm8k prompts
      fell from 8.8% to 5.0% with no change in what is refused among harmful requests, padded ones
      included. Without the floor, a padded AdvBench request behind an unrelated question (about
      0.36 alone) passed; capping such a sentence just under the line instead gave gsm8k 3.8%, but
      let the 40-prompt test prototypes' bomb request behind "What is the capital of France?"
      through to the safety prompt.

    With no whole reading (a turn too long to read whole) the sentences are all the evidence there
    is and count in full. Figures: ``benchmarks/generalisation.py``.

    Args:
        readings: ``(view name, P(unsafe))`` of each reading (names as :mod:`.views` gives them).

    Returns:
        the index of the deciding reading and its P(unsafe) as counted.
    """
    whole = [p for name, p in readings if not name.startswith(SENTENCE_VIEW)]
    numbers = [_sentence_number(name) for name, _ in readings]
    last = max(numbers)
    top = max(whole, default=1.0)  # no whole reading: the sentences count in full
    discount = _logit((1.0 + threshold) / 2) - _logit(threshold) if top < controversial else 0.0
    # Up to which sentence the discount applies: those before the last, or every one.
    upto = last if top < WHOLE_SAFE else last - 1

    def counted_as(p: float, k: int) -> float:
        if not (discount and 0 < k <= upto):
            return p
        lowered = _sigmoid(_logit(p) - discount)
        # The request itself is softened, never passed: below the refusal line it keeps its own tier.
        return max(lowered, min(p, controversial)) if k == last else lowered

    counted = [counted_as(p, k) for (_, p), k in zip(readings, numbers)]
    best = max(range(len(readings)), key=counted.__getitem__)
    return best, counted[best]


def refusal_line(prototypes: Any, item: Any, *, content: bool = False) -> float:
    """The P(unsafe) from which ``item`` is refused: the lowest of the lines that apply to it. The
    prototypes' ``threshold_`` always does; their ``content_threshold``, when set, to a text judged
    as content; their ``other_language_threshold``, when set, to a text in another language than
    English (:mod:`.language`; the content, or a request's latest user turn).

    Raises:
        ConfigError: a line is outside [controversial line, refusal line].
    """
    content_line = getattr(prototypes, "content_threshold", None)
    other = getattr(prototypes, "other_language_threshold", None)
    for name, line in (("content_threshold", content_line), ("other_language_threshold", other)):
        if line is not None:  # set_params on fitted prototypes skips the fit-time check
            check_line(name, line, prototypes.controversial_threshold_, prototypes.threshold_)
    lines = [float(prototypes.threshold_)]
    if content and content_line is not None:
        lines.append(float(content_line))
    if other is not None:
        if content:
            text = item if isinstance(item, str) else ""
        else:
            users = [m["content"] for m in to_messages(item) if m["role"] == "user"]
            text = users[-1] if users else ""
        if is_other_language(text):
            lines.append(float(other))
    return min(lines)


def _sentence_number(name: str) -> int:
    """N of a "sentence N" reading, 0 for any other reading."""
    head, _, number = name.partition(" ")
    return int(number) if head == SENTENCE_VIEW and number.isdigit() else 0


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return math.log(p / (1.0 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def judge(backbone: Any, prototypes: Any, items: Sequence[Any], *, content: bool = False,
          rows: Sequence[Encoded] | None = None, prefilled: np.ndarray | None = None) -> list[Verdict]:
    """The strictest verdict over each item's views (``verdict.view`` names the one that decided).

    Args:
        items: message lists (or strings) of requests; with ``content``, texts.
        rows: each request already encoded whole (for the views' token counts and, with
            ``prefilled``, the truncation count).
        prefilled: states already captured for the whole of each request (the prefill that ``PASS``
            continues from); a view equal to the whole request reuses them instead of a forward pass.
    """
    plan: list[list[tuple[str, int, bool]]] = []
    extra: list[list[dict[str, str]]] = []
    for i, item in enumerate(items):
        whole = None if content else to_messages(item)
        entries = []
        for view in views_of(backbone, item, content=content, row=rows[i] if rows is not None else None):
            if prefilled is not None and view.as_messages() == whole:
                entries.append((view.name, i, True))
            else:
                entries.append((view.name, len(extra), False))
                extra.append(view.as_messages())
        plan.append(entries)
    scored: list[Verdict] = []
    if extra:
        extra_rows = backbone.encode(extra)
        states = backbone.layer_states(extra_rows, prototypes.layer_ids_, poolings=prototypes.poolings_)
        scored = prototypes.verdicts(states, n_truncated=[r.n_truncated for r in extra_rows])
    pre: list[Verdict] = []
    if prefilled is not None:
        pre = prototypes.verdicts(prefilled, n_truncated=[r.n_truncated for r in rows] if rows else None)
    out = []
    for item, entries in zip(items, plan):
        candidates = [((pre if reused else scored)[k], name) for name, k, reused in entries]
        line = refusal_line(prototypes, item, content=content)
        best, p = strictest([(name, v.p_unsafe) for v, name in candidates], threshold=line,
                            controversial=prototypes.controversial_threshold_)
        verdict, name = candidates[best]
        # A failed reading keeps its fail-closed verdict.
        if (p != verdict.p_unsafe or line != verdict.threshold) and verdict.error is None:
            tier = tier_of(p, line, prototypes.controversial_threshold_)
            verdict = make_verdict(p, tier, threshold=line, category=verdict.category,
                                   layer_scores=verdict.layer_scores, n_truncated_tokens=verdict.n_truncated_tokens)
        out.append(dataclasses.replace(verdict, view=name))
    return out
