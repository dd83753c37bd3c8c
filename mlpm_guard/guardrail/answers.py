"""What a system under evaluation gives back: answers, and the system protocol.

A *system* answers prompts: the core guard (``mlpm_guard.toolkit.endtoend.GuardSystem``) or an
:class:`ExternalSystem`, a function that answers one prompt with an adapter that reads its output.
The integrations build external systems for their frameworks; the toolkit's end-to-end
evaluation (:mod:`mlpm_guard.toolkit.endtoend`) counts their routes and refusals. These types
live in the runtime so that ``import mlpm_guard`` does not load the toolkit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..vocabulary.errors import ConfigError
from ..vocabulary.types import Route
from .refusals import is_refusal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """One system answer, reduced to what the statistics need.

    Attributes:
        text: the answer text.
        route: the guard's route, or ``None`` when the system does not say.
        blocked: the guard itself refused (``REFUSE``, or replaced after output moderation).
        refused: ``blocked``, or the text opens by declining.
        tokens: generated tokens, when known.
        error: an error the system recorded or raised for this prompt.
    """

    text: str
    route: str | None = None
    blocked: bool = False
    refused: bool = False
    tokens: int | None = None
    error: str | None = None

    @classmethod
    def of(cls, text: str, *, route: str | None = None, blocked: bool = False, tokens: int | None = None,
           error: str | None = None) -> Answer:
        """An answer whose ``refused`` is worked out here: the guard's block, or a text that opens by declining."""
        return cls(text, route, blocked, blocked or is_refusal(text), tokens, error)

    @classmethod
    def from_record(cls, text: str, record: Mapping[str, Any] | None) -> Answer:
        """An answer with the route and block of the guard's decision record that came with it
        (a plain answer when the system reported none)."""
        if not record or record.get("route") is None:
            return cls.of(text)
        route = str(record["route"])
        return cls.of(text, route=route, blocked=bool(record.get("blocked", route == Route.REFUSE.value)))


class System(Protocol):
    """What :func:`mlpm_guard.toolkit.endtoend.end_to_end` needs: a description and batched answers."""

    description: str

    def answer(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[Answer]: ...


def text_answer(output: Any) -> Answer:
    """The default reader of :class:`ExternalSystem`: the output as text (``None``: no answer)."""
    return Answer.of("" if output is None else output if isinstance(output, str) else str(output))


class ExternalSystem:
    """A system outside the core guard: a function answering one prompt, and an adapter reading its outputs.

    Args:
        answer_one: answers one prompt.
        read: turns one output into an :class:`Answer` (text, and the guard's route and block
            when the system reports them); the default takes the output as text.
        answer_many: answers a list of prompts at once (a framework's native batching), tried
            before ``answer_one``.
        name: how the reports call it.
        description: the reports' line about it (default: the name and ``answer_one``'s owner).

    A prompt whose call raises gets an empty, non-refusing answer with the error recorded, so one
    failure does not sink the run; a failed ``answer_many`` falls back to one prompt at a time.
    ``max_new_tokens`` is the external system's own business and is not passed on.
    """

    def __init__(self, answer_one: Callable[[str], Any], *, read: Callable[[Any], Answer] = text_answer,
                 answer_many: Callable[[list[str]], Sequence[Any]] | None = None, name: str = "system",
                 description: str | None = None) -> None:
        self.answer_one, self.read, self.answer_many, self.name = answer_one, read, answer_many, name
        owner = getattr(answer_one, "__self__", answer_one)
        self.description = description or f"{name}: {type(owner).__name__}"

    def _outputs(self, prompts: Sequence[str]) -> list[Any]:
        """The batched outputs, or ``[]`` when there is no batch call or it failed."""
        if self.answer_many is None:
            return []
        try:
            outs = list(self.answer_many(list(prompts)))
        except Exception:  # noqa: BLE001 - find the failing prompt(s) one by one
            logger.warning("%s: the batch call failed; answering one prompt at a time", self.name)
            return []
        if len(outs) != len(prompts):
            raise ConfigError(f"{self.name}: the batch call returned {len(outs)} outputs for {len(prompts)} prompts")
        return outs

    def answer(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[Answer]:
        outs = self._outputs(prompts)
        answers = []
        for i, prompt in enumerate(prompts):
            try:
                answers.append(self.read(outs[i] if outs else self.answer_one(prompt)))
            except Exception as exc:  # noqa: BLE001 - recorded per prompt
                answers.append(Answer("", error=f"{type(exc).__name__}: {exc}"))
        return answers
