"""``evaluation_system``: a LlamaIndex query engine as a system of :func:`mlpm_guard.toolkit.endtoend.end_to_end`.

The core's end-to-end evaluation reads no framework's types; this adapter reads LlamaIndex's: the
answer text of a response (a streamed one is read to its end) and the guard's report in its
``metadata["mlpm_guard"]`` (a :class:`GuardedQueryEngine` puts it there).
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import StreamingResponse

from mlpm_guard import Answer, ExternalSystem

from llama_index.postprocessor.mlpm_guard.common import METADATA_KEY


def evaluation_system(engine: BaseQueryEngine, *, name: str = "system") -> ExternalSystem:
    """``engine`` as an end-to-end system: each prompt is answered with ``engine.query``.

    Args:
        engine: any query engine: a :class:`GuardedQueryEngine`, or an unguarded one as a reference.
        name: how the reports call it.
    """
    if not isinstance(engine, BaseQueryEngine):
        msg = f"`engine` must be a LlamaIndex query engine (BaseQueryEngine), got {type(engine).__name__}"
        raise TypeError(msg)
    return ExternalSystem(engine.query, read=read_answer, name=name,
                          description=f"{name}: {type(engine).__name__} via .query()")


def read_answer(response: Any) -> Answer:
    """The answer of one query response: its text, and the route and block of the guard's report."""
    if isinstance(response, StreamingResponse):
        response = response.get_response()
    if hasattr(response, "response"):  # a Response, or anything shaped like one
        text = response.response or ""
    else:
        text = "" if response is None else str(response)
    return Answer.from_record(text, (getattr(response, "metadata", None) or {}).get(METADATA_KEY))
