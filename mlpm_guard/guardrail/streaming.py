"""Text that leaves the guard piece by piece: tokens turned into text, text held back for output
moderation, and an answer cut at a stop string.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from ..vocabulary.types import Tier

P = TypeVar("P")


class Detokenizer:
    """Turns a growing list of token ids into text pieces without splitting a multi-byte character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.text = text[len(self.text):], text
        return piece


class HoldBack(Generic[P]):
    """Streamed pieces waiting for output moderation: a piece leaves only after a passing check
    that also saw ``tokens`` more tokens after it (its context, which can reveal it as harmful).

    The pieces are whatever the stream carries: text, or the upstream chunks of a proxied stream.
    """

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.pending: collections.deque[tuple[P, int]] = collections.deque()
        self.n_pending = 0

    def add(self, piece: P, tokens: int) -> None:
        self.pending.append((piece, tokens))
        self.n_pending += tokens

    def release(self, *, everything: bool = False) -> list[P]:
        """The pieces a passing check covering everything added so far lets out, in order."""
        out = []
        while self.pending and (everything or self.n_pending - self.pending[0][1] >= self.tokens):
            piece, tokens = self.pending.popleft()
            self.n_pending -= tokens
            out.append(piece)
        return out


class OutputWatch(Generic[P]):
    """Output moderation of one streamed answer, for every way an answer streams (the guard's own
    decoding, a proxied upstream, a LangChain chain): the answer's pieces come in; a check of the
    answer so far is due every ``check_every`` tokens; a piece goes out only after a check that
    read it, everything before it back to the start of the answer, and the ``hold_back`` tokens
    after it found the answer confidently safe (the safe tier). A check that is not sure holds
    everything back; the verdict of the whole answer, at its end, decides whether the held text
    goes out or the refusal replaces it. The caller runs the checks (synchronously or not) and
    reports each verdict, and stops the answer when a check is all but certain (:attr:`stopped`).

    Checks fall every ``check_every`` tokens, with one more at the start, as soon as a check can
    release something (``hold_back`` tokens after the first), so the consumer's first token waits
    for the held-back tokens and one check, less than a check interval while ``hold_back`` is
    below ``check_every``. A larger ``hold_back`` keeps more of a continuation the checks are
    still reading away from the consumer.
    """

    def __init__(self, check_every: int, hold_back: int, stop_at: float | None = None) -> None:
        self.check_every, self.stop_at = check_every, stop_at
        self.held: HoldBack[P] = HoldBack(hold_back)
        self.parts: list[str] = []
        self.tokens = 0
        self.next_check = min(check_every, hold_back + 1)
        self.verdict: Any = None  # the last check's verdict
        self.unjudged = False

    @property
    def text(self) -> str:
        """The answer so far."""
        return "".join(self.parts)

    @property
    def flagged(self) -> bool:
        return self.verdict is not None and bool(self.verdict.unsafe)

    @property
    def stopped(self) -> bool:
        """The last check was all but certain (``stop_at``): the answer ends here, flagged."""
        return self.flagged and self.stop_at is not None and self.verdict.p_unsafe >= self.stop_at

    def add(self, piece: P, text: str, tokens: int) -> bool:
        """Take a piece (``text`` is what it adds to the answer); True when a check is due now."""
        self.held.add(piece, tokens)
        self.parts.append(text)
        self.tokens += tokens
        self.unjudged = self.unjudged or bool(text)
        if self.tokens < self.next_check:
            return False
        self.next_check = (self.tokens // self.check_every + 1) * self.check_every
        return True

    def checked(self, verdict: Any) -> list[P]:
        """Record the verdict of a check of :attr:`text`; returns the pieces it lets out (none unless
        the verdict is in the safe tier)."""
        self.verdict, self.unjudged = verdict, False
        return self.held.release() if verdict.tier is Tier.SAFE else []

    @property
    def due_at_end(self) -> bool:
        """Whether the answer's end still needs a check (text came after the last one)."""
        return self.verdict is None or self.unjudged

    def rest(self) -> list[P]:
        """Everything still held, once a check of the whole answer passed."""
        return self.held.release(everything=True)


class StopCut:
    """Cuts streamed text just before the first stop string, holding back what could start one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.buffer = ""
        self.done = False

    def push(self, piece: str) -> str:
        """The text that can leave now; after a stop string (``done``) nothing more does."""
        if self.done or not self.stop:
            return "" if self.done else piece
        self.buffer += piece
        hits = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.buffer, self.done = self.buffer[:min(hits)], "", True
            return out
        cut = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        """What was held back, once the text has ended without a stop string."""
        out, self.buffer = self.buffer, ""
        return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) its first stop string."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(hits)] if hits else text
