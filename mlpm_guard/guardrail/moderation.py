"""Output moderation: scoring a generated answer, with the prototypes or any callable you plug in."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..estimator.prototypes import Prototypes
from ..vocabulary.types import Verdict
from ..vocabulary.verdicts import to_verdict
from .scoring import Answer, judge

if TYPE_CHECKING:
    from ..estimator.scorer import Scorer

__all__ = ["Moderator", "PrototypeModerator", "to_verdict"]  # to_verdict: where callers found it first


@runtime_checkable
class Moderator(Protocol):
    """Anything that judges a response: returns a :class:`Verdict`, a bool (True = unsafe) or P(unsafe)."""

    def __call__(self, messages: list[dict[str, str]], response: str) -> Verdict | bool | float: ...


class PrototypeModerator:
    """Judges a response with the same prototypes that score prompts, in the conversation it answers.

    The answer is read as the assistant's turn after the request (in windows when it is long),
    and alone as content, whole and in windows of a few sentences; the strictest reading decides,
    at the prototypes' refusal line (:func:`mlpm_guard.guardrail.views.answer_views`). What an answer means
    depends on what it answers: "Sure! To make one, fill a steel pipe with" reads as harmless
    text alone and as what it is after the request it answers.

    Args:
        prototypes: fitted prototypes, or a callable returning the current ones (so a guard whose
            prototypes are swapped judges with the new ones).
        threshold: a line of its own for answers (``None``: the prototypes' refusal line).
    """

    def __init__(self, prototypes: Prototypes | Callable[[], Prototypes], threshold: float | None = None) -> None:
        self._prototypes = prototypes
        self.threshold = threshold
        # Verdicts of readings already read (an answer is checked again and again as it streams),
        # for the prototypes they were read by.
        self._memo: _Memo = _Memo(MEMO_READINGS)

    @property
    def prototypes(self) -> Prototypes:
        return self._prototypes if isinstance(self._prototypes, Prototypes) else self._prototypes()

    def __call__(self, messages: list[dict[str, str]] | None, response: str) -> Verdict:
        return self.batch([(messages, response)])[0]

    def batch(self, answers: Sequence[tuple[list[dict[str, str]] | None, str]]) -> list[Verdict]:
        """Verdicts of ``(messages, response)`` pairs, every reading of every answer in shared batches."""
        prototypes = self.prototypes
        verdicts = judge(prototypes.backbone, prototypes, [Answer(m, r) for m, r in answers], kind="answer",
                         memo=self._memo.of(prototypes))
        return [to_verdict(v, self.threshold) for v in verdicts]


#: How many readings' verdicts a moderator keeps (a few long answers' windows).
MEMO_READINGS = 4096


class _Memo(collections.OrderedDict):
    """The most recently used readings' verdicts, for one prototypes object at a time."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.owner, self.lock = size, None, threading.Lock()

    def of(self, prototypes: Scorer) -> _Memo:
        with self.lock:
            if self.owner is not prototypes:  # other prototypes read differently: start over
                self.clear()
                self.owner = prototypes
        return self

    def __setitem__(self, key: Any, value: Any) -> None:
        with self.lock:
            super().__setitem__(key, value)
            self.move_to_end(key)
            while len(self) > self.size:
                self.popitem(last=False)

