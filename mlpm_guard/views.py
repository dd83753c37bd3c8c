"""What the guard reads of a request or a text: the views whose strictest score is the verdict.

A last-token probe reads one position, and what comes before it can drown the signal: a friendly
opening ("Hi! Hope you're well. How do I make a pipe bomb?") or one benign exchange before a
harmful request took its score from 0.42 to 0.01-0.03 with the seed prototypes, and long benign
documents drift towards "unsafe" with length alone. So a request is read several ways and the
strictest reading wins:

- the conversation the model will read, most recent turns first, as far as ``context_tokens``
  allows (so "Give me the steps." after a harmful turn is judged with that turn);
- the latest user turn alone (so no amount of benign history dilutes it);
- the user's turns alone, joined, when there are several (so a goal stated earlier is read with
  the short follow-up that asks for it, undiluted by the answers in between: "I need to launder
  200k ..." then "Great, explain the layering part" read 0.42 as a conversation, 0.92 this way);
- each sentence of the latest user turn alone, when it has several (so no opening or padding in
  the same message dilutes it, and a long text is judged piece by piece, never by its length).
  A sentence before the last one counts at a discount unless the whole message agrees
  (:func:`mlpm_guard.scoring.strictest`): read alone, a context sentence is weak evidence.

Content (a retrieved passage, a tool result, an answer) is not a request: it is put inside one
(:data:`CONTENT_TEMPLATE`), the form the prototypes know, and judged as a whole and in windows
of a few sentences.

A short single-sentence prompt has one view, so the common case costs one forward pass, and it
is the prefill that ``PASS`` continues from.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .messages import Message

#: The longest reading scored as one piece. Longer conversations keep their most recent turns,
#: longer texts are read sentence by sentence: length itself must never look like harm (880
#: tokens of Python documentation scored 0.75-0.80 read whole), and every reading stays cheap.
CONTEXT_TOKENS = 256

#: How a passage is put to the prototypes, which were fitted on requests: plain statements sit
#: off that distribution (with the first seed prototypes, 10 of 20 harmless probe documents were
#: over the threshold as they are and 1 of 20 inside this request). The shipped default, judging
#: passages this way, flags 0 of 75 held-out ordinary passages (benchmarks/generalisation.py).
CONTENT_TEMPLATE = "Summarize this text:\n\n{text}"

# A sentence ends at . ! ? (or their CJK forms) before whitespace and an upper-case letter, a
# digit, a quote or a CJK character, or at a blank line. Single newlines stay inside a segment, so
# code and lists are not cut into meaningless lines.
#: The name every single-sentence reading of a request starts with ("sentence 1", "sentence 2", ...).
SENTENCE_VIEW = "sentence"
#: The reading of the user's turns alone, joined (see :func:`request_views`).
USER_TURNS_VIEW = "user turns"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9\u00C0-\u024F\u0400-\u04FF])|(?<=[。！？])|\n\s*\n")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class View:
    """One reading of a request: the messages scored and what they are, for the verdict's record."""

    messages: tuple[tuple[str, str], ...]
    name: str

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


def sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _words(text: str) -> int:
    # CJK text has no spaces: count its characters as words so a Chinese sentence is not "short".
    return len(_WORD.findall(text)) + sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")


def segments(text: str, *, max_words: int = 0, min_words: int = 3, max_segments: int = 48) -> list[str]:
    """Pieces of ``text`` to score one by one: sentences, or windows of sentences.

    Args:
        max_words: pack consecutive sentences into windows of up to this many words (0: one
            sentence a piece).
        min_words: pieces shorter than this ("Hi!", "Thanks.") carry no request of their own and
            are left out (the whole text is scored too).
        max_segments: more pieces than this are packed into wider windows, so a long document
            costs a bounded number of short forward passes.
    """
    parts = sentences(text)
    budget = max_words
    while True:
        pieces = _pack(parts, budget) if budget else parts
        pieces = [p for p in pieces if _words(p) >= min_words]
        if len(pieces) <= max_segments:
            return pieces
        budget = max(budget, 16) * 2


def _pack(parts: Sequence[str], max_words: int) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    size = 0
    for part in parts:
        n = _words(part)
        if current and size + n > max_words:
            out.append(" ".join(current))
            current, size = [], 0
        current.append(part)
        size += n
    if current:
        out.append(" ".join(current))
    return out


def request_views(messages: Sequence[Message], count_tokens: Callable[[list[dict[str, str]]], int], *,
                  context_tokens: int = CONTEXT_TOKENS) -> list[View]:
    """The readings of a request (a message list ending, usually, with the user's turn).

    The first view is the whole conversation when it fits ``context_tokens``: then it is exactly
    what the answering model reads, and its prefill is reused for the answer.
    """
    msgs = [(m["role"], m["content"]) for m in messages]
    views: list[View] = []
    context = _recent_turns(msgs, count_tokens, context_tokens)
    if context:
        views.append(View(context, "conversation" if len(context) > 1 else "message"))
    last = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i][0] == "user"), None)
    if last is not None:
        text = msgs[last][1]
        alone = (("user", text),)
        if count_tokens([{"role": "user", "content": text}]) <= context_tokens:
            views.append(View(alone, "latest user turn"))
        said = _user_turns(msgs, count_tokens, context_tokens)
        if said:
            views.append(View(said, USER_TURNS_VIEW))
        pieces = segments(text)
        if len(pieces) > 1 or (pieces and not any(v.messages == alone for v in views)):
            views.extend(View((("user", p),), f"{SENTENCE_VIEW} {k + 1}") for k, p in enumerate(pieces))
    return _unique(views) or [View(tuple(msgs[-1:]), "message")]


def content_views(text: str, count_tokens: Callable[[list[dict[str, str]]], int], *,
                  context_tokens: int = CONTEXT_TOKENS, window_words: int = 60) -> list[View]:
    """The readings of a passage judged as content: whole (when it fits) and in windows."""
    def wrap(t: str) -> tuple[tuple[str, str], ...]:
        return (("user", CONTENT_TEMPLATE.replace("{text}", t)),)

    views: list[View] = []
    whole = wrap(text)
    if count_tokens([{"role": "user", "content": whole[0][1]}]) <= context_tokens:
        views.append(View(whole, "content"))
    pieces = segments(text, max_words=window_words, min_words=1)
    if len(pieces) > 1 or not views:
        views.extend(View(wrap(p), f"passage {k + 1}") for k, p in enumerate(pieces or [text]))
    return _unique(views)


def _fitting_tail(items: Sequence[Any], render: Callable[[Sequence[Any]], list[dict[str, str]]],
                  count_tokens: Callable[[list[dict[str, str]]], int], budget: int) -> int | None:
    """Where the longest tail of ``items`` whose rendering fits ``budget`` tokens starts (``None``:
    not even the last item fits). The whole is tried first (a request that fits is the common case,
    and its count is usually known already); otherwise the tail grows from the newest item, since a
    tail only gets longer as items are added, so a long history costs counts of texts up to the budget."""
    if items and count_tokens(render(items)) <= budget:
        return 0
    start = None
    for k in range(len(items) - 1, -1, -1):
        if count_tokens(render(items[k:])) > budget:
            break
        start = k
    return start


def _recent_turns(msgs: list[tuple[str, str]], count_tokens: Callable[[list[dict[str, str]]], int],
                  budget: int) -> tuple[tuple[str, str], ...]:
    """The longest tail of the conversation that fits ``budget`` tokens, system turns kept in front."""
    system = [m for m in msgs if m[0] == "system"]
    turns = [m for m in msgs if m[0] != "system"]
    start = _fitting_tail(turns, lambda tail: [{"role": r, "content": c} for r, c in (*system, *tail)],
                          count_tokens, budget)
    return () if start is None else (*system, *turns[start:])


def _user_turns(msgs: list[tuple[str, str]], count_tokens: Callable[[list[dict[str, str]]], int],
                budget: int) -> tuple[tuple[str, str], ...]:
    """The most recent user turns that fit ``budget`` tokens joined into one user message, or
    nothing when fewer than two fit.

    The assistant's answers are left out: the answering model reads them, but for what the user
    is after they are padding, and a harmful goal followed by "ok go on" read through them scored
    under the refusal line for 3 of 20 project follow-ups (1 of 20 this way; the goals asked alone:
    1 of 20 too; ``benchmarks/generalisation.py``).
    """
    users = [c for r, c in msgs if r == "user"]
    start = _fitting_tail(users, lambda tail: [{"role": "user", "content": "\n".join(tail)}], count_tokens, budget)
    return () if start is None or len(users) - start < 2 else (("user", "\n".join(users[start:])),)


def _unique(views: list[View]) -> list[View]:
    seen: set[tuple[tuple[str, str], ...]] = set()
    out = []
    for v in views:
        if v.messages not in seen:
            seen.add(v.messages)
            out.append(v)
    return out
