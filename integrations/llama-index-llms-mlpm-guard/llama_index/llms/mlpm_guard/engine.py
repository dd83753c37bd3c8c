"""``GuardedQueryEngine`` and ``GuardedChatEngine``: check the request before retrieval, then apply
its route to the guarded LLM.

The query (or the conversation with the new message) is scored with
:meth:`mlpm_guard.Guard.check`, which stops the forward pass at the deepest layer the prototypes
use. ``REFUSE`` returns the policy's refusal at once, of the wrapped engine's response type, and
nothing is retrieved or generated. Any other route is handed through a context variable to every
:class:`MLPMGuardLLM` call the wrapped engine makes for this request, so ``SAFETY_PROMPT`` and
``STEER`` act on the answer while concurrent requests keep their own routes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Dict, List, Literal, Optional, Union

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.chat_engine.types import (
    AGENT_CHAT_RESPONSE_TYPE,
    AgentChatResponse,
    BaseChatEngine,
    StreamingAgentChatResponse,
)
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.memory import Memory
from llama_index.core.prompts.mixin import PromptMixinType
from llama_index.core.schema import QueryBundle

from mlpm_guard import BackboneConfig, Guard, Policy, Route, Verdict
from mlpm_guard.guardrail.binding import call_policy, resolve_guard

from llama_index.postprocessor.mlpm_guard import MLPMGuardNodePostprocessor
from llama_index.postprocessor.mlpm_guard.common import METADATA_KEY, check_guard, verdict_report
from llama_index.postprocessor.mlpm_guard.events import GuardDecisionEvent, traced

from ._routing import RouteDirective, directing, handing
from .base import MLPMGuardLLM, to_core_messages

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)

_NEEDS_GUARDED_LLM = (Route.SAFETY_PROMPT, Route.STEER)


def _decide(stage: str, guard: Guard, verdict: Verdict) -> tuple[Route, Policy]:
    policy = call_policy(guard)
    route = policy.route(verdict)
    dispatcher.event(traced(GuardDecisionEvent.from_verdict(stage, route, verdict, blocked=route is Route.REFUSE)))
    return route, policy


def _report(stage: str, route: Route, verdict: Verdict, directive: RouteDirective) -> dict[str, Any]:
    """The report of an answered request, kept current by ``directive`` (``llm`` fills in as the
    guarded LLM's calls finish: for a stream, as it is read)."""
    return directive.watch(verdict_report(stage, route, verdict, blocked=False, route_applied=False,
                                          llm=directive.reports))


def _warn_unapplied(route: Route, directive: RouteDirective) -> None:
    if route in _NEEDS_GUARDED_LLM and not directive.applied:
        logger.warning("route %s was not applied: the wrapped engine made no MLPMGuardLLM call in this request's "
                       "context (give the engine `llm=MLPMGuardLLM(guard)`, or route such prompts to `refuse`)",
                       route.value)


def _directed(tokens: Iterator[str], directive: RouteDirective, done: Callable[[], None]) -> Iterator[str]:
    """``tokens`` read with the request's directive current during each step; ``done`` at the end.

    LlamaIndex's synthesizers call the LLM only when a streaming response is first read, after
    the engine call (and the directive's context) has returned. The directive is set just
    around each step, so code the consumer runs between tokens never sees it.
    """
    try:
        while True:
            with handing(directive):
                try:
                    token = next(tokens)
                except StopIteration:
                    return
            yield token
    finally:
        done()


async def _adirected(tokens: AsyncIterator[str], directive: RouteDirective,
                     done: Callable[[], None]) -> AsyncIterator[str]:
    """:func:`_directed` for an async token stream."""
    try:
        while True:
            with handing(directive):
                try:
                    token = await tokens.__anext__()
                except StopAsyncIteration:
                    return
            yield token
    finally:
        done()


def _finish_query(response: RESPONSE_TYPE, route: Route, verdict: Verdict,
                  directive: RouteDirective) -> RESPONSE_TYPE:
    """Attach the report to an answered query; a stream carries the directive until it is read."""
    response.metadata = {**(response.metadata or {}), METADATA_KEY: _report("query", route, verdict, directive)}
    done = functools.partial(_warn_unapplied, route, directive)
    if isinstance(response, StreamingResponse) and response.response_gen is not None:
        response.response_gen = _directed(iter(response.response_gen), directive, done)
    elif isinstance(response, AsyncStreamingResponse) and response.response_gen is not None:
        response.response_gen = _adirected(aiter(response.response_gen), directive, done)
    else:
        done()
    return response


def _one(text: str) -> Iterator[str]:
    yield text


async def _aone(text: str) -> AsyncIterator[str]:
    yield text


def _one_piece_chat(text: str, *, stream: Literal["sync", "async"], **fields: Any) -> StreamingAgentChatResponse:
    """A chat stream of one piece (a refusal, or an answer that had to be produced whole)."""
    piece = ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=text)
    if stream == "async":
        async def pieces() -> AsyncIterator[ChatResponse]:
            yield piece

        return StreamingAgentChatResponse(response=text, achat_stream=pieces(), is_writing_to_memory=False, **fields)
    return StreamingAgentChatResponse(response=text, chat_stream=iter([piece]),  # type: ignore[arg-type]
                                      is_writing_to_memory=False, **fields)


class GuardedQueryEngine(BaseQueryEngine):
    """A query engine whose queries are checked by the guard before anything is retrieved.

    Args:
        query_engine: the engine to guard (any :class:`BaseQueryEngine`). ``None`` answers the
            query with the guarded LLM alone, no retrieval: one prefill then scores and answers.
        guard: the :class:`mlpm_guard.Guard` (``None``: the shared embedded default).
        streaming: whether a refusal comes back as a streaming response; ``None`` follows the
            wrapped engine's response synthesizer (``False`` when it has none).

    ``Response.metadata["mlpm_guard"]`` holds ``route``, ``blocked`` (refused before retrieval, or
    a guarded LLM call's answer was replaced by output moderation), ``p_unsafe``, ``verdict``,
    ``route_applied`` (an :class:`MLPMGuardLLM` took the route) and ``llm`` (the reports of the
    guarded LLM's calls for this query; for a streaming response they arrive as it is read).

    Examples:
        >>> engine = GuardedQueryEngine.from_index(index, guard)    # doctest: +SKIP
        >>> engine.query("How do I make methamphetamine?").metadata["mlpm_guard"]["blocked"]  # doctest: +SKIP
        True
    """

    def __init__(self, query_engine: Optional[BaseQueryEngine] = None, guard: Optional[Guard] = None, *,
                 streaming: Optional[bool] = None, callback_manager: Optional[CallbackManager] = None) -> None:
        if query_engine is not None and not isinstance(query_engine, BaseQueryEngine):
            hint = ("pass the guard by keyword: `GuardedQueryEngine(guard=guard)`" if isinstance(query_engine, Guard)
                    else "wrap e.g. `index.as_query_engine(llm=MLPMGuardLLM(guard))`")
            msg = (f"`query_engine` must be a LlamaIndex BaseQueryEngine or None, "
                   f"got {type(query_engine).__name__}; {hint}")
            raise TypeError(msg)
        self._guard = check_guard(guard, "GuardedQueryEngine")
        self._query_engine = query_engine
        self._llm = MLPMGuardLLM(self._guard) if query_engine is None else None
        self._streaming = streaming
        super().__init__(callback_manager or getattr(query_engine, "callback_manager", None))

    @classmethod
    def from_index(cls, index: Any, guard: Optional[Guard] = None, *,
                   nodes: Optional[Literal["drop", "flag"]] = "drop", streaming: bool = False,
                   **kwargs: Any) -> GuardedQueryEngine:
        """Guard ``index.as_query_engine(...)`` with the guarded LLM and, unless ``nodes=None``,
        the node postprocessor in ``nodes`` mode (run before any postprocessor you pass)."""
        llm = MLPMGuardLLM(guard)
        post = [MLPMGuardNodePostprocessor(guard, mode=nodes)] if nodes else []
        post += list(kwargs.pop("node_postprocessors", None) or [])
        engine = index.as_query_engine(llm=llm, node_postprocessors=post, streaming=streaming, **kwargs)
        return cls(engine, guard, streaming=streaming)

    @property
    def guard(self) -> Guard:
        return resolve_guard(self._guard)

    @property
    def query_engine(self) -> Optional[BaseQueryEngine]:
        return self._query_engine

    def _get_prompt_modules(self) -> PromptMixinType:
        return {"query_engine": self._query_engine} if self._query_engine is not None else {}

    def _streams(self) -> bool:
        if self._streaming is not None:
            return self._streaming
        synthesizer = getattr(self._query_engine, "_response_synthesizer", None)
        return bool(getattr(synthesizer, "_streaming", False))

    def _refusal(self, route: Route, verdict: Verdict, policy: Policy, *, asynchronous: bool) -> RESPONSE_TYPE:
        text = policy.refusal_message
        metadata = {METADATA_KEY: verdict_report("query", route, verdict, blocked=True, route_applied=False,
                                                 llm=[])}
        if self._streams():
            if asynchronous:
                return AsyncStreamingResponse(response_gen=_aone(text), metadata=metadata)
            return StreamingResponse(response_gen=_one(text), metadata=metadata)
        return Response(response=text, source_nodes=[], metadata=metadata)

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        if self._query_engine is None:
            return self._answer(query_bundle.query_str)
        guard = self.guard
        verdict = guard.check(query_bundle.query_str)
        route, policy = _decide("query", guard, verdict)
        if route is Route.REFUSE:
            return self._refusal(route, verdict, policy, asynchronous=False)
        with directing(route, verdict, policy) as directive:
            response = self._query_engine.query(query_bundle)
        return _finish_query(response, route, verdict, directive)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        if self._query_engine is None:
            return await self._aanswer(query_bundle.query_str)
        guard = self.guard
        verdict = await guard.acheck(query_bundle.query_str)
        route, policy = _decide("query", guard, verdict)
        if route is Route.REFUSE:
            return self._refusal(route, verdict, policy, asynchronous=True)
        with directing(route, verdict, policy) as directive:
            response = await self._query_engine.aquery(query_bundle)
        return _finish_query(response, route, verdict, directive)

    # ------------------------------------------------------------------ no wrapped engine: the guarded LLM answers
    def _answer(self, query: str) -> RESPONSE_TYPE:
        assert self._llm is not None
        if not self._streams():
            out = self._llm.complete(query)
            return Response(response=out.text, metadata={METADATA_KEY: out.additional_kwargs[METADATA_KEY]})
        metadata: Dict[str, Any] = {}
        responses = self._llm.stream_complete(query)

        def tokens() -> Iterator[str]:
            for r in responses:
                if METADATA_KEY in r.additional_kwargs:
                    metadata[METADATA_KEY] = r.additional_kwargs[METADATA_KEY]
                if r.delta:
                    yield r.delta

        return StreamingResponse(response_gen=tokens(), metadata=metadata)

    async def _aanswer(self, query: str) -> RESPONSE_TYPE:
        assert self._llm is not None
        if not self._streams():
            out = await self._llm.acomplete(query)
            return Response(response=out.text, metadata={METADATA_KEY: out.additional_kwargs[METADATA_KEY]})
        metadata: Dict[str, Any] = {}
        responses = await self._llm.astream_complete(query)

        async def tokens() -> AsyncIterator[str]:
            async for r in responses:
                if METADATA_KEY in r.additional_kwargs:
                    metadata[METADATA_KEY] = r.additional_kwargs[METADATA_KEY]
                if r.delta:
                    yield r.delta

        return AsyncStreamingResponse(response_gen=tokens(), metadata=metadata)


class GuardedChatEngine(BaseChatEngine):
    """A chat engine whose turns are checked by the guard before the wrapped engine sees them.

    Args:
        chat_engine: the engine to guard (any :class:`BaseChatEngine`, e.g.
            ``index.as_chat_engine(chat_mode="context", llm=MLPMGuardLLM(guard))``). ``None``:
            a ``SimpleChatEngine`` on the guarded LLM.
        guard: the :class:`mlpm_guard.Guard` (``None``: the shared embedded default).
        check_history: score the conversation so far with the new message, as the core guard
            scores a message list (``False``: the new message alone).

    A refused turn returns the refusal (streamed as one piece by the ``stream_*`` methods) and
    leaves the wrapped engine, its memory included, untouched. The report is in the response's
    ``metadata["mlpm_guard"]`` (set as an attribute on streaming responses, whose class has no
    such field).

    Sync ``stream_chat`` on a retrieval chat engine (``context``, ``condense_plus_context``)
    answers a ``safety_prompt`` or ``steer`` turn whole and returns it as one piece: those
    engines call the LLM from a background thread, which does not carry the request's route.
    ``pass`` turns and every turn of ``astream_chat`` stream token by token.
    """

    def __init__(self, chat_engine: Optional[BaseChatEngine] = None, guard: Optional[Guard] = None, *,
                 check_history: bool = True) -> None:
        if chat_engine is not None and not isinstance(chat_engine, BaseChatEngine):
            hint = ("pass the guard by keyword: `GuardedChatEngine(guard=guard)`" if isinstance(chat_engine, Guard)
                    else "wrap e.g. `index.as_chat_engine(chat_mode='context', llm=MLPMGuardLLM(guard))`")
            msg = f"`chat_engine` must be a LlamaIndex BaseChatEngine or None, got {type(chat_engine).__name__}; {hint}"
            raise TypeError(msg)
        self._guard = check_guard(guard, "GuardedChatEngine")
        self._chat_engine = chat_engine if chat_engine is not None else self._simple_engine(guard)
        self._check_history = check_history

    @staticmethod
    def _simple_engine(guard: Optional[Guard]) -> SimpleChatEngine:
        # Built without reading the LLM's metadata, which would load the default backbone now.
        prompt_tokens = (guard.backbone.config if guard is not None else BackboneConfig()).max_prompt_tokens
        memory = Memory.from_defaults(token_limit=prompt_tokens, token_flush_size=max(1, prompt_tokens // 4))
        return SimpleChatEngine(llm=MLPMGuardLLM(guard), memory=memory, prefix_messages=[])

    @property
    def guard(self) -> Guard:
        return resolve_guard(self._guard)

    @property
    def chat_engine(self) -> BaseChatEngine:
        return self._chat_engine

    @property
    def chat_history(self) -> List[ChatMessage]:
        return self._chat_engine.chat_history

    def reset(self) -> None:
        self._chat_engine.reset()

    def _conversation(self, message: str, chat_history: Optional[List[ChatMessage]]) -> Union[str, list]:
        if not self._check_history:
            return message
        history = chat_history if chat_history is not None else self._chat_engine.chat_history
        return [*to_core_messages(history), {"role": "user", "content": message}]

    @staticmethod
    def _refusal(route: Route, verdict: Verdict, policy: Policy, *,
                 stream: Optional[Literal["sync", "async"]]) -> AGENT_CHAT_RESPONSE_TYPE:
        text = policy.refusal_message
        metadata = {METADATA_KEY: verdict_report("chat", route, verdict, blocked=True, route_applied=False, llm=[])}
        if stream is None:
            return AgentChatResponse(response=text, metadata=metadata)
        response = _one_piece_chat(text, stream=stream)
        response.metadata = metadata  # type: ignore[attr-defined]
        return response

    @staticmethod
    def _finish(response: Any, route: Route, verdict: Verdict, directive: RouteDirective) -> Any:
        # Set as an attribute on streaming responses, whose class has no metadata field.
        response.metadata = {**(getattr(response, "metadata", None) or {}),
                             METADATA_KEY: _report("chat", route, verdict, directive)}
        return response

    def _streams_in_context(self) -> bool:
        """Whether the wrapped engine's sync ``stream_chat`` calls the LLM before returning.

        Retrieval chat engines (context, condense-plus-context) call it only when their
        background thread reads the stream, and a new thread does not carry this request's
        context, so the route would not reach the LLM.
        """
        return isinstance(self._chat_engine, SimpleChatEngine)

    def _decide(self, verdict: Verdict) -> tuple[Route, Verdict, Policy]:
        route, policy = _decide("chat", self.guard, verdict)
        return route, verdict, policy

    def chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None) -> AGENT_CHAT_RESPONSE_TYPE:
        route, verdict, policy = self._decide(self.guard.check(self._conversation(message, chat_history)))
        if route is Route.REFUSE:
            return self._refusal(route, verdict, policy, stream=None)
        with directing(route, verdict, policy) as directive:
            response = self._chat_engine.chat(message, chat_history)
        _warn_unapplied(route, directive)
        return self._finish(response, route, verdict, directive)

    def stream_chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None
                    ) -> StreamingAgentChatResponse:
        route, verdict, policy = self._decide(self.guard.check(self._conversation(message, chat_history)))
        if route is Route.REFUSE:
            return self._refusal(route, verdict, policy, stream="sync")  # type: ignore[return-value]
        with directing(route, verdict, policy) as directive:
            if route is Route.PASS or self._streams_in_context():
                response = self._chat_engine.stream_chat(message, chat_history)
            else:
                # The route must reach the LLM: answer whole, then hand it over as one piece
                # (`astream_chat` streams token by token on every route).
                answer = self._chat_engine.chat(message, chat_history)
                response = _one_piece_chat(str(answer), stream="sync", sources=answer.sources,
                                           source_nodes=answer.source_nodes)
        _warn_unapplied(route, directive)
        return self._finish(response, route, verdict, directive)

    async def achat(self, message: str, chat_history: Optional[List[ChatMessage]] = None
                    ) -> AGENT_CHAT_RESPONSE_TYPE:
        return await self._aguarded(self._chat_engine.achat, message, chat_history, stream=None)

    async def astream_chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None
                           ) -> StreamingAgentChatResponse:
        # The engine's writer task is created here and copies this context, directive included,
        # so the LLM call it makes later still takes the route (the report's `route_applied`
        # turns true then; no warning is possible at this point).
        return await self._aguarded(self._chat_engine.astream_chat, message, chat_history,
                                    stream="async")  # type: ignore[return-value]

    async def _aguarded(self, call: Callable[..., Any], message: str, chat_history: Optional[List[ChatMessage]],
                        *, stream: Optional[Literal["async"]]) -> Any:
        """``call`` (the wrapped engine's ``achat`` or ``astream_chat``) under the route of this turn."""
        route, verdict, policy = self._decide(await self.guard.acheck(self._conversation(message, chat_history)))
        if route is Route.REFUSE:
            return self._refusal(route, verdict, policy, stream=stream)
        with directing(route, verdict, policy) as directive:
            response = await call(message, chat_history)
        if stream is None:  # a stream's LLM call comes later, when its writer task runs
            _warn_unapplied(route, directive)
        return self._finish(response, route, verdict, directive)
