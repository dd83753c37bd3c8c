"""State-dict runnables (LangGraph graphs, ``create_agent`` agents) under ``with_guard``.

A graph takes and returns a state (``{"messages": [...], ...}``) and may keep a thread in a
checkpointer: the model then reads the thread's history plus the new input. So for a graph the
guard scores that whole conversation, and a refusal is a state of the same shape (the
conversation plus the refusal ``AIMessage``), written to the thread so the checkpointer keeps the
refused turn, and streamed in whichever stream mode the caller asked for.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, RemoveMessage, convert_to_messages
from langchain_core.runnables import Runnable, RunnableConfig

logger = logging.getLogger(__name__)

#: The node name a refusal is reported under in ``stream_mode="updates"`` and ``"messages"``.
NODE = "mlpm_guard"


def is_graph(runnable: Runnable[Any, Any]) -> bool:
    try:
        from langgraph.pregel import Pregel
    except ImportError:  # langgraph is optional
        return False
    return isinstance(runnable, Pregel)


def _thread(graph: Any, config: RunnableConfig | None) -> bool:
    """Whether this call runs on a checkpointed thread."""
    return bool(graph.checkpointer) and bool((config or {}).get("configurable", {}).get("thread_id"))


def history(graph: Any, config: RunnableConfig | None, key: str) -> list[BaseMessage]:
    """The messages the thread already holds (empty without a checkpointed thread)."""
    if not _thread(graph, config):
        return []
    return list(graph.get_state(config).values.get(key) or [])


def new_messages(value: Mapping[str, Any], key: str) -> list[BaseMessage]:
    raw = value[key]
    return convert_to_messages([raw] if isinstance(raw, (str, BaseMessage)) else raw)


def refusal_message(text: str, record: dict[str, Any], flag_key: str) -> AIMessage:
    return AIMessage(content=text, id=f"mlpm-guard-{uuid.uuid4()}", response_metadata={flag_key: record}, name=NODE)


def refused_state(graph: Any, value: Mapping[str, Any], key: str, refusal: AIMessage,
                  config: RunnableConfig | None) -> dict[str, Any]:
    """The state a refused turn leaves: persisted in the thread when there is one."""
    turn = [*new_messages(value, key), refusal]
    if _thread(graph, config):
        try:
            graph.update_state(config, {key: turn})
            return dict(graph.get_state(config).values)
        except Exception as exc:  # noqa: BLE001 - the refusal still reaches the caller
            logger.warning("could not write the refused turn to the thread: %s: %s", type(exc).__name__, exc)
    return {**value, key: [*history(graph, config, key), *turn]}


def refused_stream(state: dict[str, Any], key: str, refusal: AIMessage, record: dict[str, Any],
                   stream_mode: Any, subgraphs: bool = False) -> Iterator[Any]:
    """What ``graph.stream`` would have yielded for the refused turn, in each requested mode."""
    modes = [stream_mode] if isinstance(stream_mode, str) else list(stream_mode)
    chunk = AIMessageChunk(content=refusal.content, id=refusal.id, response_metadata=refusal.response_metadata)
    shapes = {
        "values": state,
        "updates": {NODE: {key: [refusal]}},
        "messages": (chunk, {"langgraph_node": NODE}),
        "custom": record,
    }
    for mode in modes:
        if mode not in shapes:
            continue  # debug / tasks / checkpoints: no graph step ran
        single = isinstance(stream_mode, str)
        out = shapes[mode] if single else (mode, shapes[mode])
        if subgraphs:  # (namespace, chunk) or (namespace, mode, chunk), as LangGraph yields them
            out = ((), out) if single else ((), *out)
        yield out


def without(state: Any, key: str, message_id: str) -> Any:
    """A state with one message (the per-call safety prompt) taken out."""
    if not isinstance(state, Mapping) or not isinstance(state.get(key), Sequence):
        return state
    return {**state, key: [m for m in state[key] if getattr(m, "id", None) != message_id]}


def forget(graph: Any, config: RunnableConfig | None, key: str, message_id: str) -> None:
    """Remove a per-call message from the thread, so the checkpointer never keeps it."""
    if _thread(graph, config):
        try:
            graph.update_state(config, {key: [RemoveMessage(id=message_id)]})
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not remove the safety prompt from the thread: %s: %s", type(exc).__name__, exc)
