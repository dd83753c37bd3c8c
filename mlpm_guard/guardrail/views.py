"""What the guard reads of a request or a text: the views whose strictest score is the verdict.

A last-token probe reads one position, and what comes before it can drown the signal: a friendly
opening or one benign exchange before a harmful request pulls its score down, and a long text
drifts with its length alone. And what the answering model reads is everything it is given, in
whatever form a capable model can read. So a request is read several ways, and the strictest
reading wins (:func:`mlpm_guard.guardrail.scoring.strictest`):

- the conversation the model will read, most recent turns first, as far as ``context_tokens``
  allows (so "Give me the steps." after a harmful turn is judged with that turn);
- the latest user turn alone (so no amount of benign history dilutes it);
- the user's turns alone, joined, when there are several (so a goal stated earlier is read with
  the short follow-up that asks for it, undiluted by the answers in between);
- each sentence of the latest user turn alone, when it has several, and windows of a few
  sentences when it is too long to read whole;
- every other turn (system, tool, assistant, earlier user turns) sentence by sentence and in
  windows of a few sentences, so an instruction hidden in a long tool result or system message is
  read at the length of a request. Read alone, a sentence that is not the request itself is weak
  evidence and counts at a discount unless a whole reading agrees (:func:`~mlpm_guard.guardrail.scoring.strictest`);
- the same again in the request's canonical form (:mod:`.canonical`: letters spread out,
  invisible characters, look-alike letters, leetspeak, encoded payloads), when it has one.

Every token of every turn is in at least one reading of at most :data:`WINDOW_WORDS` words
(sentences longer than :data:`PIECE_WORDS` words are cut into overlapping pieces); nothing is
ever dropped unread, no reading surrounds a sentence with more than a window of other text, and
the number of readings grows linearly with the length of the text.

Content (a retrieved passage, a tool result) is not a request: it is put inside one
(:data:`CONTENT_TEMPLATE`), the form the prototypes know, and judged as a whole when it fits and in
overlapping windows of a few sentences. An answer's meaning depends on what it answers: it is read
as the assistant's turn of its conversation (:func:`answer_views`), and alone as content.

A short single-sentence prompt has one view, so the common case costs one forward pass, and it
is the prefill that ``PASS`` continues from.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..vocabulary.messages import Message
from .canonical import canonical, label

#: The longest reading scored as one piece. Longer conversations keep their most recent turns,
#: longer texts are read sentence by sentence and in windows: length itself must never look like
#: harm, and every reading stays cheap.
CONTEXT_TOKENS = 256
#: Sentences longer than this (in words) are read in overlapping pieces of this length.
PIECE_WORDS = 32
#: The longest window of consecutive sentences read together.
WINDOW_WORDS = 64

#: How a passage is put to the prototypes, which were fitted on requests: plain statements sit
#: off that distribution, and inside a request for them they read as what they are.
CONTENT_TEMPLATE = "Summarize this text:\n\n{text}"

#: The name every single-sentence reading of the latest user turn starts with ("sentence 1", ...).
SENTENCE_VIEW = "sentence"
#: The name every window of the latest user turn starts with ("window 1", ...).
WINDOW_VIEW = "window"
#: The reading of the user's turns alone, joined (see :func:`request_views`).
USER_TURNS_VIEW = "user turns"
#: The readings of an answer as the assistant's turn of its conversation, and alone (see
#: :func:`answer_views`); both are context to :func:`~mlpm_guard.guardrail.scoring.strictest`.
ANSWER_VIEW = "answer in context"
ANSWER_ALONE = "answer alone"
#: Separates a canonical form's name from the reading's ("normalised + spread: sentence 2").
FORM_SEPARATOR = ": "

# A sentence ends at . ! ? ... (or their CJK forms), with any closing quotes or brackets, before
# whitespace, whatever the case of what follows (lower-case text is split too); or at a blank
# line. Single newlines stay inside a sentence, so code and lists are not cut into single lines.
_SENTENCE_END = re.compile(r"(?<=[.!?\u2026])\s+|(?<=[.!?\u2026][\"'\u2019\u201d)\]])\s+|(?<=[。！？])|\n\s*\n")
_WORD = re.compile(r"\w+", re.UNICODE)

Part = Literal["whole", "sentence", "context"]


@dataclass(frozen=True)
class View:
    """One reading of a request: the messages scored and what they are, for the verdict's record."""

    messages: tuple[tuple[str, str], ...]
    name: str

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


def part_of(name: str) -> tuple[Part, int]:
    """What a reading named ``name`` is to :func:`~mlpm_guard.guardrail.scoring.strictest`: a whole reading,
    sentence ``k`` of the latest user turn, or context (a window, a sentence of another turn)."""
    name = name.rpartition(FORM_SEPARATOR)[2]
    head, _, number = name.partition(" ")
    if head == SENTENCE_VIEW and number.isdigit():
        return "sentence", int(number)
    if head == WINDOW_VIEW or " turn " in name or name.startswith((ANSWER_VIEW, ANSWER_ALONE)):
        return "context", 0
    return "whole", 0


def form_of(name: str) -> str:
    """The canonical form a reading is in (``""``: the text as given)."""
    form, separator, _ = name.rpartition(FORM_SEPARATOR)
    return form if separator else ""


def sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _words(text: str) -> int:
    # CJK text has no spaces: count its characters as words so a Chinese sentence is not "short".
    return len(_WORD.findall(text)) + sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")


def pieces(text: str, *, max_words: int = PIECE_WORDS) -> list[str]:
    """The sentences of ``text``, a sentence longer than ``max_words`` cut into pieces of that
    many words that overlap by half (so any stretch of up to half as many words is whole in one)."""
    out: list[str] = []
    for sentence in sentences(text):
        if _words(sentence) <= max_words:
            out.append(sentence)
            continue
        tokens = sentence.split()
        step = max(1, max_words // 2)
        for start in range(0, max(1, len(tokens) - step), step):
            out.append(" ".join(tokens[start:start + max_words]))
    return out


def windows(parts: Sequence[str], *, max_words: int = WINDOW_WORDS) -> list[str]:
    """Consecutive ``parts`` joined into windows of up to ``max_words`` words, each window starting
    half-way into the one before, so every part and every pair of neighbours is in one window."""
    sizes = [_words(p) for p in parts]
    out: list[str] = []
    start = 0
    while start < len(parts):
        end, total = start, 0
        while end < len(parts) and (end == start or total + sizes[end] <= max_words):
            total += sizes[end]
            end += 1
        out.append(" ".join(parts[start:end]))
        if end >= len(parts):
            break
        # The next window starts at the part that holds the middle of this one (at least one on).
        half, run, nxt = total / 2, 0, start + 1
        for k in range(start, end):
            run += sizes[k]
            if run > half:
                nxt = max(k, start + 1)
                break
        start = nxt
    return out


def segments(text: str, *, min_words: int = 3) -> list[str]:
    """The pieces of ``text`` long enough to carry a request of their own (``"Hi!"`` does not)."""
    return [p for p in pieces(text) if _words(p) >= min_words]


def request_views(messages: Sequence[Message], count_tokens: Callable[[list[dict[str, str]]], int], *,
                  context_tokens: int = CONTEXT_TOKENS) -> list[View]:
    """The readings of a request (a message list ending, usually, with the user's turn), then the
    readings of its canonical form when it has one (:mod:`.canonical`).

    The first view is the whole conversation when it fits ``context_tokens``: then it is exactly
    what the answering model reads, and its prefill is reused for the answer.
    """
    msgs = [(m["role"], m["content"]) for m in messages]
    views = _readings(msgs, count_tokens, context_tokens)
    forms = [canonical(c) for _, c in msgs]
    if any(forms):
        name = label(s for f in forms if f for s in f.steps)
        other = [(r, f.text if f else c) for (r, c), f in zip(msgs, forms)]
        views += [View(v.messages, f"{name}{FORM_SEPARATOR}{v.name}")
                  for v in _readings(other, count_tokens, context_tokens)]
    return _unique(views) or [View(tuple(msgs[-1:]), "message")]


def _readings(msgs: list[tuple[str, str]], count_tokens: Callable[[list[dict[str, str]]], int],
              budget: int) -> list[View]:
    views: list[View] = []
    context = _recent_turns(msgs, count_tokens, budget)
    if context:
        views.append(View(context, "conversation" if len(context) > 1 else "message"))
    last = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i][0] == "user"), None)
    if last is not None:
        text = msgs[last][1]
        alone = (("user", text),)
        fits = count_tokens([{"role": "user", "content": text}]) <= budget
        if fits:
            views.append(View(alone, "latest user turn"))
        said = _user_turns(msgs, count_tokens, budget)
        if said:
            views.append(View(said, USER_TURNS_VIEW))
        parts = segments(text)
        if len(parts) > 1 or (parts and not any(v.messages == alone for v in views)):
            views.extend(View((("user", p),), f"{SENTENCE_VIEW} {k + 1}") for k, p in enumerate(parts))
        if not fits:
            views.extend(View((("user", w),), f"{WINDOW_VIEW} {k + 1}")
                         for k, w in enumerate(windows(pieces(text))))
    # Other turns are read alone when no whole reading holds them (they fell out of the conversation
    # tail) or when they are longer than a window (inside one, a hidden sentence would be diluted).
    # A short turn in the tail is read in its context only: read alone, a declined harmful request
    # would refuse every ordinary turn after it.
    turns = [i for i, (r, _) in enumerate(msgs) if r != "system"]
    held = sum(r != "system" for r, _ in context)
    in_tail = set(turns[len(turns) - held:]) if held else set()
    if any(r == "system" for r, _ in context):
        in_tail |= {i for i, (r, _) in enumerate(msgs) if r == "system"}
    for i, (role, text) in enumerate(msgs):
        if i != last and text.strip() and (i not in in_tail or _words(text) > WINDOW_WORDS):
            views.extend(_turn_readings(role, i + 1, text))
    return views


def _turn_readings(role: str, number: int, text: str) -> list[View]:
    """A turn other than the latest user turn, read as a request a sentence and a window at a time."""
    parts = pieces(text)
    out = [View((("user", p),), f"{role} turn {number}, sentence {k + 1}")
           for k, p in enumerate(q for q in parts if _words(q) >= 3)]
    if len(parts) > 2:
        out += [View((("user", w),), f"{role} turn {number}, window {k + 1}") for k, w in enumerate(windows(parts))]
    return out


def content_views(text: str, count_tokens: Callable[[list[dict[str, str]]], int], *,
                  context_tokens: int = CONTEXT_TOKENS) -> list[View]:
    """The readings of a passage judged as content: whole (when it fits) and in overlapping
    windows of a few sentences, then the same of its canonical form when it has one."""
    views = _content_readings(text, count_tokens, context_tokens)
    form = canonical(text)
    if form is not None:
        views += [View(v.messages, f"{label(form.steps)}{FORM_SEPARATOR}{v.name}")
                  for v in _content_readings(form.text, count_tokens, context_tokens)]
    return _unique(views)


def answer_views(messages: Sequence[Message], answer: str, count_tokens: Callable[[list[dict[str, str]]], int], *,
                 context_tokens: int = CONTEXT_TOKENS) -> list[View]:
    """The readings of an answer: as the assistant's turn of the conversation it answers, and alone
    as content (:func:`content_views`). All of them are context, not the user's request: the
    strictest counts at a discount (it refuses from ``(1 + threshold) / 2``).

    In its conversation it is read after as many of the latest turns as fit ``context_tokens``;
    an answer too long for that is read a window at a time after the request it answers (the
    latest user turn, or its last window when that is long too). Without a conversation only the
    content readings remain.
    """
    msgs = [(m["role"], m["content"]) for m in messages]
    turn = ("assistant", answer)
    views: list[View] = []
    if any(r == "user" for r, _ in msgs):
        tail = _recent_turns([*msgs, turn], count_tokens, context_tokens)
        if tail and tail[-1] == turn and any(r == "user" for r, _ in tail):
            views.append(View(tail, ANSWER_VIEW))
        else:
            request = next(c for r, c in reversed(msgs) if r == "user")
            if count_tokens([{"role": "user", "content": request}]) > context_tokens // 2:
                request = windows(pieces(request))[-1]
            views.extend(View((("user", request), ("assistant", w)), f"{ANSWER_VIEW}, window {k + 1}")
                         for k, w in enumerate(windows(pieces(answer)) or [answer]))
    alone = [View(v.messages, _alone_name(v.name))
             for v in content_views(answer, count_tokens, context_tokens=context_tokens)]
    return _unique(views + alone)


def _alone_name(name: str) -> str:
    """A content reading's name for an answer read alone ("content" -> "answer alone", "passage 2"
    -> "answer alone, passage 2"; a canonical form's prefix kept)."""
    form, separator, rest = name.rpartition(FORM_SEPARATOR)
    own = ANSWER_ALONE if rest == "content" else f"{ANSWER_ALONE}, {rest}"
    return f"{form}{separator}{own}"


def _content_readings(text: str, count_tokens: Callable[[list[dict[str, str]]], int], budget: int) -> list[View]:
    def wrap(t: str) -> tuple[tuple[str, str], ...]:
        return (("user", CONTENT_TEMPLATE.replace("{text}", t)),)

    views: list[View] = []
    whole = wrap(text)
    if count_tokens([{"role": "user", "content": whole[0][1]}]) <= budget:
        views.append(View(whole, "content"))
    spans = windows(pieces(text))
    if len(spans) > 1 or not views:
        views.extend(View(wrap(w), f"passage {k + 1}") for k, w in enumerate(spans or [text]))
    return views


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
    """The longest tail of the conversation that fits ``budget`` tokens, system turns kept in front
    (when they fit too: a system message too long to read whole is read in windows instead)."""
    system = [m for m in msgs if m[0] == "system"]
    turns = [m for m in msgs if m[0] != "system"]
    start = _fitting_tail(turns, lambda tail: [{"role": r, "content": c} for r, c in (*system, *tail)],
                          count_tokens, budget)
    if start is None and system:
        start, system = _fitting_tail(turns, lambda tail: [{"role": r, "content": c} for r, c in tail],
                                      count_tokens, budget), []
    return () if start is None else (*system, *turns[start:])


def _user_turns(msgs: list[tuple[str, str]], count_tokens: Callable[[list[dict[str, str]]], int],
                budget: int) -> tuple[tuple[str, str], ...]:
    """The most recent user turns that fit ``budget`` tokens joined into one user message, or
    nothing when fewer than two fit.

    The assistant's answers are left out: the answering model reads them, but for what the user
    is after they are padding, and a harmful goal followed by "ok go on" read through them can
    fall under the refusal line where the same goal asked alone does not.
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
