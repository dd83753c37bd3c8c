"""What every LangChain adapter shares: reading LangChain inputs, shaping
outputs, and putting the decision record (:meth:`mlpm_guard.Decision.to_dict`) where events,
metadata and traces carry it.

Nothing here keeps per-call state: each function takes what it needs and returns a new value,
so one adapter instance can serve concurrent calls.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForChainRun,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    BaseMessageChunk,
    SystemMessage,
    convert_to_messages,
)
from langchain_core.prompt_values import ChatPromptValue, PromptValue, StringPromptValue
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.utils import AddableDict
from langchain_core.tracers.base import BaseTracer

from mlpm_guard import InputError
from mlpm_guard.guardrail import telemetry
from mlpm_guard.vocabulary.messages import with_system_prompt

#: Name of the custom event every adapter dispatches (visible in ``astream_events``).
EVENT_NAME = "mlpm_guard"
#: Key of the decision record in message ``response_metadata``, in dict outputs and in document metadata.
FLAG_KEY = "mlpm_guard"
#: Name of the child run that records each guard check in traces.
CHECK_RUN_NAME = "mlpm_guard_check"
#: Dict keys searched for the user's text when an adapter's ``input_key`` is not set.
DEFAULT_INPUT_KEYS = ("input", "question", "query", "messages")

OutputKind = Literal["str", "message", "dict"]

# ---------------------------------------------------------------------------- reading inputs
def content_text(content: Any) -> str:
    """The text of a message content: a string, or the text blocks of a multimodal list."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool"}


def guard_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """LangChain messages (or tuples/dicts they convert from) as the core's ``{"role", "content"}`` dicts."""
    out = []
    for m in convert_to_messages(messages):
        role = getattr(m, "role", None) if m.type == "chat" else _ROLES.get(m.type)
        if role is None:
            msg = f"cannot guard a message of type {m.type!r}; supported types are {sorted(_ROLES)} and 'chat'"
            raise InputError(msg)
        out.append({"role": role, "content": content_text(m.content)})
    return out


def dict_key(value: Mapping[str, Any], input_key: str | None) -> str:
    if input_key is not None:
        if input_key not in value:
            msg = f"`input_key` is {input_key!r} but the input dict has keys {sorted(value)}; set `input_key` to " \
                  "the key that holds the user's text"
            raise InputError(msg)
        return input_key
    for key in DEFAULT_INPUT_KEYS:
        if key in value:
            return key
    msg = f"cannot find the user's text in a dict with keys {sorted(value)} (looked for {list(DEFAULT_INPUT_KEYS)}); " \
          "pass `input_key=` naming the key that holds it"
    raise InputError(msg)


def prompt_messages(value: Any, input_key: str | None = None) -> list[dict[str, str]]:
    """The whole conversation in an input (what a hosted backbone answers)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, StringPromptValue):
        return [{"role": "user", "content": value.text}]
    if isinstance(value, PromptValue):
        return guard_messages(value.to_messages())
    if isinstance(value, BaseMessage):
        return guard_messages([value])
    if isinstance(value, Mapping):
        return prompt_messages(value[dict_key(value, input_key)], input_key)
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        if not value:
            raise InputError("the input is an empty message list; give at least one human message")
        return guard_messages(value)
    msg = f"cannot read a prompt from an input of type {type(value).__name__}; give a str, a list of messages, " \
          "a PromptValue, or a dict holding one of them (with `input_key`)"
    raise InputError(msg)


def query_text(value: Any, input_key: str | None = None) -> str:
    """The text the guard scores for an external chain: the string, or the last human message."""
    messages = prompt_messages(value, input_key)
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    msg = "the input has no human message to check; the guard scores the last human turn"
    raise InputError(msg)


def aggregate(chunks: Sequence[Any], owner: str) -> Any:
    """The whole input of a transform: the chunks added up, or the last one if they do not add."""
    if not chunks:
        msg = f"{owner} got an empty input stream; it needs the user's input"
        raise InputError(msg)
    total = chunks[0]
    for chunk in chunks[1:]:
        try:
            total = total + chunk
        except TypeError:
            total = chunk
    return total


# ---------------------------------------------------------------------------- the safety prompt route
def _system_of(message: BaseMessage) -> str | None:
    return message.content if isinstance(message, SystemMessage) and isinstance(message.content, str) else None


def _system_message(text: str, _replaced: BaseMessage | None) -> BaseMessage:
    return SystemMessage(content=text)


def _with_system(messages: Sequence[BaseMessage], safety_prompt: str) -> list[BaseMessage]:
    return with_system_prompt(messages, safety_prompt, system_of=_system_of, make=_system_message)


def with_safety(value: Any, safety_prompt: str, prefix: str, input_key: str | None = None) -> Any:
    """The input with the safety prompt: a system message for chat inputs, ``prefix`` before text inputs."""
    if isinstance(value, str):
        return prefix + value
    if isinstance(value, StringPromptValue):
        return StringPromptValue(text=prefix + value.text)
    if isinstance(value, ChatPromptValue):
        return ChatPromptValue(messages=_with_system(value.messages, safety_prompt))
    if isinstance(value, PromptValue):
        return ChatPromptValue(messages=_with_system(value.to_messages(), safety_prompt))
    if isinstance(value, Mapping):
        key = dict_key(value, input_key)
        out = dict(value)
        out[key] = with_safety(value[key], safety_prompt, prefix, input_key)
        return out
    if isinstance(value, BaseMessage):
        return _with_system([value], safety_prompt)
    if isinstance(value, Sequence):
        return _with_system(convert_to_messages(value), safety_prompt)
    msg = f"cannot add a safety prompt to an input of type {type(value).__name__}"
    raise InputError(msg)


# ---------------------------------------------------------------------------- outputs
class GuardedText(str):
    """A string answer that carries the guard's decision in ``.mlpm_guard`` (a str has no metadata).

    It is a plain ``str`` everywhere else: equal to the text, JSON-serialisable as the text.
    """

    mlpm_guard: dict[str, Any] | None

    def __new__(cls, text: str, decision: dict[str, Any] | None = None) -> GuardedText:
        obj = super().__new__(cls, text)
        obj.mlpm_guard = decision
        return obj


#: The output kinds by the class an output is an instance of.
_KINDS: tuple[tuple[type, OutputKind], ...] = ((str, "str"), (BaseMessage, "message"), (Mapping, "dict"))


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def type_kind(tp: Any) -> OutputKind | None:
    """``"str"``, ``"message"`` or ``"dict"`` for a runnable's declared output type (``None``: unknown)."""
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        kinds = {type_kind(a) for a in typing.get_args(tp) if _unwrap(a) is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if origin is not None:
        tp = origin
    if not isinstance(tp, type):
        return None
    return next((kind for cls, kind in _KINDS if issubclass(tp, cls)), None)


def value_kind(value: Any) -> OutputKind | None:
    """``"str"``, ``"message"`` or ``"dict"`` for an output value (``None``: none of them)."""
    return next((kind for cls, kind in _KINDS if isinstance(value, cls)), None)


def input_kind(value: Any) -> OutputKind:
    """The output kind to assume when the wrapped runnable does not declare one: answer in the input's shape."""
    if isinstance(value, (str, StringPromptValue)):
        return "str"
    if isinstance(value, Mapping):
        return "dict"
    return "message"


def make_output(kind: OutputKind, text: str, decision: dict[str, Any], output_key: str, *,
                chunk: bool = False) -> Any:
    """A new answer of ``kind`` holding ``text`` and the decision (a refusal, or a replaced answer)."""
    if kind == "str":
        return GuardedText(text, decision)
    if kind == "dict":
        return AddableDict({output_key: text, FLAG_KEY: decision})
    cls = AIMessageChunk if chunk else AIMessage
    return cls(content=text, response_metadata={FLAG_KEY: decision})


def with_flag(output: Any, decision: dict[str, Any]) -> Any:
    """The chain's own output with the decision attached (a copy; the original is left alone)."""
    if isinstance(output, str):
        return GuardedText(output, decision)
    if isinstance(output, BaseMessage):
        return output.model_copy(update={"response_metadata": {**output.response_metadata, FLAG_KEY: decision}})
    if isinstance(output, Mapping):
        out = AddableDict(output) if isinstance(output, AddableDict) else dict(output)
        out[FLAG_KEY] = decision
        return out
    return output


def flag_chunk(first_chunk: Any, decision: dict[str, Any]) -> Any | None:
    """An empty chunk of the stream's own type carrying the decision, to end a stream with (``None``: no type fits)."""
    if isinstance(first_chunk, str):
        return GuardedText("", decision)
    if isinstance(first_chunk, BaseMessageChunk):
        return AIMessageChunk(content="", response_metadata={FLAG_KEY: decision})
    if isinstance(first_chunk, Mapping):
        return AddableDict({FLAG_KEY: decision})
    return None


def output_text(output: Any, output_key: str) -> str:
    """The answer text inside a chain's output (or a stream chunk of it)."""
    if isinstance(output, str):
        return output
    if isinstance(output, BaseMessage):
        return content_text(output.content)
    if isinstance(output, Mapping):
        if output_key not in output:
            return ""
        return output_text(output[output_key], output_key)
    msg = f"cannot find the answer text in an output of type {type(output).__name__} for output moderation; " \
          "the wrapped chain must return a str, a message, or a dict with `output_key`"
    raise InputError(msg)


# ---------------------------------------------------------------------------- decisions
def run_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """Flat ``mlpm_guard_*`` keys for run metadata (what tracing UIs filter on)."""
    keys = ("stage", "route", "applied_route", "blocked", "p_unsafe", "tier", "category", "view")
    return {f"mlpm_guard_{k}": record.get(k) for k in keys}


def report(run_manager: Any | None, inputs: Any, record: dict[str, Any], *, start_ns: int | None = None,
           model: str | None = None) -> None:
    """Put a decision where traces show it: a child run named :data:`CHECK_RUN_NAME` (inputs: what
    was judged, outputs: the decision) under ``run_manager``'s run, ``mlpm_guard_*`` keys in that
    run's metadata for every tracer attached to it (LangSmith included), and an OpenTelemetry span.

    Custom events alone are not recorded by LangChain's tracers, hence the child run. The decision
    is known only after the run started, so its metadata is updated on the tracers' run records
    (which they send when the run ends).
    """
    telemetry.decision_span(record.get("stage", "input"), record, start_ns=start_ns, model=model,
                            framework="langchain")
    if run_manager is None:
        return
    flat = _annotate(run_manager, record)
    manager = CallbackManager(handlers=run_manager.handlers, inheritable_handlers=run_manager.inheritable_handlers,
                              parent_run_id=run_manager.run_id, tags=run_manager.tags,
                              metadata={**run_manager.metadata, **flat})
    child = manager.on_chain_start({"name": CHECK_RUN_NAME}, _run_inputs(inputs), name=CHECK_RUN_NAME)
    child.on_chain_end(record)


async def areport(run_manager: Any | None, inputs: Any, record: dict[str, Any], *, start_ns: int | None = None,
                  model: str | None = None) -> None:
    """:func:`report` for async run managers."""
    if run_manager is None or not isinstance(run_manager, (AsyncCallbackManagerForChainRun,
                                                           AsyncCallbackManagerForLLMRun)):
        report(run_manager, inputs, record, start_ns=start_ns, model=model)
        return
    telemetry.decision_span(record.get("stage", "input"), record, start_ns=start_ns, model=model,
                            framework="langchain")
    flat = _annotate(run_manager, record)
    manager = AsyncCallbackManager(handlers=run_manager.handlers,
                                   inheritable_handlers=run_manager.inheritable_handlers,
                                   parent_run_id=run_manager.run_id, tags=run_manager.tags,
                                   metadata={**run_manager.metadata, **flat})
    child = await manager.on_chain_start({"name": CHECK_RUN_NAME}, _run_inputs(inputs), name=CHECK_RUN_NAME)
    await child.on_chain_end(record)


def _annotate(run_manager: Any, record: dict[str, Any]) -> dict[str, Any]:
    """The flat metadata of a decision, added to ``run_manager``'s run in every tracer that holds it."""
    flat = run_metadata(record)
    for handler in {id(h): h for h in [*run_manager.handlers, *run_manager.inheritable_handlers]}.values():
        if isinstance(handler, BaseTracer):
            run = handler.run_map.get(str(run_manager.run_id))
            if run is not None:
                run.extra.setdefault("metadata", {}).update(flat)
    return flat


def _run_inputs(inputs: Any) -> dict[str, Any]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    return {"input": inputs}


def emit(record: dict[str, Any], config: RunnableConfig | None) -> None:
    """Dispatch the decision as the ``mlpm_guard`` custom event of the current run."""
    dispatch_custom_event(EVENT_NAME, record, config=config)


async def aemit(record: dict[str, Any], config: RunnableConfig | None) -> None:
    await adispatch_custom_event(EVENT_NAME, record, config=config)


def emit_llm(record: dict[str, Any], run_manager: Any | None) -> None:
    """Dispatch the decision as a custom event of a chat-model run.

    LLM run managers have no child manager, so the event is sent to the run's own handlers. The
    streaming path of ``BaseChatModel`` gives ``_stream`` no run manager; the event then goes to
    the enclosing run (the chain the model streams in), or nowhere when there is none.
    """
    if run_manager is None:
        with contextlib.suppress(RuntimeError):  # no enclosing run: the last chunk still carries it
            dispatch_custom_event(EVENT_NAME, record)
        return
    manager = CallbackManager(handlers=run_manager.handlers, parent_run_id=run_manager.run_id,
                              tags=run_manager.tags, metadata=run_manager.metadata)
    manager.on_custom_event(EVENT_NAME, record, run_id=run_manager.run_id)


async def aemit_llm(record: dict[str, Any], run_manager: Any | None) -> None:
    if run_manager is None:
        with contextlib.suppress(RuntimeError):
            await adispatch_custom_event(EVENT_NAME, record)
        return
    manager = AsyncCallbackManager(handlers=run_manager.handlers, parent_run_id=run_manager.run_id,
                                   tags=run_manager.tags, metadata=run_manager.metadata)
    await manager.on_custom_event(EVENT_NAME, record, run_id=run_manager.run_id)
