"""``evaluation_system``: a LangChain runnable as a system of :func:`mlpm_guard.toolkit.endtoend.end_to_end`.

The core's end-to-end evaluation reads no framework's types; this adapter reads LangChain's: the
answer text of a ``str``, a message or a dict output, and the guard's decision record where the
guarded adapters put it (``GuardedText.mlpm_guard``, a message's ``response_metadata``, a dict's
``mlpm_guard`` key, the last message of an agent's ``{"messages": [...]}`` state).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable

from mlpm_guard import Answer, ExternalSystem

from ._common import FLAG_KEY, GuardedText, content_text

#: Dict keys searched, in order, for the answer text of a dict output when ``output_key`` is not set.
OUTPUT_KEYS = ("output", "answer", "response", "text", "content", "result")


def evaluation_system(runnable: Runnable[Any, Any], *, name: str = "system",
                      output_key: str | None = None) -> ExternalSystem:
    """``runnable`` as an end-to-end system: each chunk of prompts goes through its native
    ``batch`` (one prompt at a time with ``invoke`` if the batch fails).

    Args:
        runnable: any runnable taking a prompt string: a guarded chain (``with_guard``), a chat
            model (``ChatMLPMGuard``), an unguarded chain as a reference.
        name: how the reports call it.
        output_key: the dict key of the answer text (default: the first of :data:`OUTPUT_KEYS`).
    """
    if not isinstance(runnable, Runnable):
        msg = f"`runnable` must be a LangChain Runnable, got {type(runnable).__name__}"
        raise TypeError(msg)
    return ExternalSystem(runnable.invoke, answer_many=runnable.batch,
                          read=functools.partial(read_answer, output_key=output_key), name=name,
                          description=f"{name}: {runnable.get_name()} via .batch()")


def read_answer(output: Any, output_key: str | None = None) -> Answer:
    """The answer of one runnable output: its text, and the route and block of the guard's decision."""
    output = _last_message(output)
    return Answer.from_record(_text(output, output_key), _record(output))


def _last_message(output: Any) -> Any:
    """An agent's state answers with its last message."""
    if isinstance(output, Mapping) and isinstance(output.get("messages"), Sequence) and output["messages"] \
            and isinstance(output["messages"][-1], BaseMessage):
        return output["messages"][-1]
    return output


def _record(output: Any) -> Mapping[str, Any] | None:
    if isinstance(output, GuardedText):
        return output.mlpm_guard
    if isinstance(output, BaseMessage):
        return output.response_metadata.get(FLAG_KEY)
    if isinstance(output, Mapping):
        return output.get(FLAG_KEY)
    return None


def _text(output: Any, output_key: str | None) -> str:
    if output is None:
        return ""
    if isinstance(output, str):
        return str(output)
    if isinstance(output, BaseMessage):
        return content_text(output.content)
    if isinstance(output, Mapping):
        key = output_key if output_key is not None else next((k for k in OUTPUT_KEYS if k in output), None)
        return _text(output.get(key), output_key) if key is not None else ""
    return str(output)
