"""``ChatMLPMGuard``: the guarded hosted backbone as a LangChain chat model.

``prompt | ChatMLPMGuard() | StrOutputParser()`` works like any chat model: every answer is
scored from the backbone's own prefill, routed by the policy, and carries the decision in
``response_metadata["mlpm_guard"]``; the decision also goes out as the ``mlpm_guard`` custom event.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing, closing
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from pydantic import Field

from mlpm_guard import GuardResult
from mlpm_guard.guardrail.streaming import StopCut, cut_at_stop

from ._common import FLAG_KEY, aemit_llm, areport, emit_llm, guard_messages, report
from ._settings import GuardSettings
from .runnable import usage

# Answers computed by one batched prefill in ``batch``/``abatch``, keyed by conversation, for
# the per-input ``_generate`` calls that LangChain then makes (each with its own callbacks and
# run). A context variable, not instance state: concurrent batches never see each other's.
_PREPARED: contextvars.ContextVar[dict[tuple, deque[GuardResult]] | None] = contextvars.ContextVar(
    "mlpm_guard_prepared_answers", default=None)


def _key(messages: Sequence[dict[str, str]]) -> tuple:
    return tuple((m["role"], m["content"]) for m in messages)


def _prepared_result(messages: Sequence[dict[str, str]]) -> GuardResult | None:
    """The answer a batch already computed for this conversation (one prefill for many), if any."""
    prepared = _PREPARED.get()
    queue = prepared.get(_key(messages)) if prepared else None
    return queue.popleft() if queue else None


class ChatMLPMGuard(GuardSettings, BaseChatModel):
    """A chat model served by the guarded hosted backbone.

    Args:
        guard: the core guard (``None``: the shared default ``mlpm_guard.Guard()``, loaded on first use).
        policy: a policy replacing the guard's for this model.
        unsafe_at / controversial_at: thresholds over the policy's (``configurable_fields`` makes
            them settable per run).
        max_new_tokens / temperature: decoding overrides (``None``: the guard's settings).

    ``batch`` scores and answers all prompts in one batched prefill (``Guard.batch``) while each
    input keeps its own run and callbacks. Stop sequences cut the answer (and stop the stream).
    Tool calling and structured output are not supported (``bind_tools`` and
    ``with_structured_output`` say what to use instead: :class:`MLPMGuardMiddleware`, or
    ``with_guard`` around a tool-capable model).

    Example:
        ```python
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.prompts import ChatPromptTemplate
        from langchain_mlpm_guard import ChatMLPMGuard

        chain = ChatPromptTemplate.from_template("{input}") | ChatMLPMGuard(max_new_tokens=64) | StrOutputParser()
        chain.invoke({"input": "Name three prime numbers"})
        ```
    """

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)

    @property
    def _llm_type(self) -> str:
        return "mlpm-guard"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.resolved_guard().backbone.name, "unsafe_at": self.unsafe_at,
                "controversial_at": self.controversial_at, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "mlpm_guard"
        params["ls_model_name"] = kwargs.get("model") or self.resolved_guard().backbone.name
        return params

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        msg = ("ChatMLPMGuard does not call tools: the hosted guard backbone is a small model that answers in text. "
               "To guard a tool-using agent, give create_agent a tool-capable model and "
               "middleware=[MLPMGuardMiddleware(guard)], or wrap that model with with_guard(model, guard).")
        raise NotImplementedError(msg)

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Any:
        msg = ("ChatMLPMGuard has no structured output (it cannot call tools or follow a JSON schema reliably). "
               "Guard a model that does with with_guard(model.with_structured_output(schema), guard), or use "
               "MLPMGuardMiddleware in create_agent(..., response_format=schema).")
        raise NotImplementedError(msg)

    def _generation(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        own = {k: v for k, v in (("max_new_tokens", self.max_new_tokens), ("temperature", self.temperature))
               if v is not None}
        return {**own, **kwargs}

    def _message(self, result: GuardResult, text: str, *, chunk: bool = False) -> AIMessage:
        cls = AIMessageChunk if chunk else AIMessage
        return cls(content=text, response_metadata={FLAG_KEY: result.decision().to_dict(),
                                                    "model_name": self.resolved_guard().backbone.name},
                   usage_metadata=usage(result))

    # ------------------------------------------------------------------ one conversation
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        guard = self.resolved_guard()
        prompt = guard_messages(messages)
        result = _prepared_result(prompt)
        if result is None:
            result = guard.invoke(prompt, policy=self.call_policy(guard), **self._generation(kwargs))
        emit_llm(result.decision().to_dict(), run_manager)
        report(run_manager, {"messages": prompt}, result.decision().to_dict(), model=guard.backbone.name)
        return self._result(result, stop)

    def _result(self, result: GuardResult, stop: list[str] | None) -> ChatResult:
        message = self._message(result, cut_at_stop(result.text, stop or []))
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={FLAG_KEY: message.response_metadata[FLAG_KEY]})

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        guard = self.resolved_guard()
        prompt = guard_messages(messages)
        result = _prepared_result(prompt)
        if result is None:
            result = await guard.ainvoke(prompt, policy=self.call_policy(guard), **self._generation(kwargs))
        await aemit_llm(result.decision().to_dict(), run_manager)
        await areport(run_manager, {"messages": prompt}, result.decision().to_dict(), model=guard.backbone.name)
        return self._result(result, stop)

    # ------------------------------------------------------------------ many conversations, one prefill
    def _prepare(self, inputs: Sequence[Any]) -> list[list[dict[str, str]]] | None:
        """Each input's conversation, or ``None`` to leave the batch to the per-input path."""
        if len(inputs) < 2:
            return None
        try:
            return [guard_messages(self._convert_input(x).to_messages()) for x in inputs]
        except Exception:  # noqa: BLE001 - an unreadable input: the per-input path reports it
            return None

    @staticmethod
    def _queues(prompts: list[list[dict[str, str]]], results: list[GuardResult]) -> dict[tuple, deque[GuardResult]]:
        queues: dict[tuple, deque[GuardResult]] = {}
        for prompt, result in zip(prompts, results):
            queues.setdefault(_key(prompt), deque()).append(result)
        return queues

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        prompts = self._prepare(inputs)
        if prompts is None:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        guard = self.resolved_guard()
        gen = self._generation({k: v for k, v in kwargs.items() if k != "stop"})
        results = guard.batch(prompts, policy=self.call_policy(guard), **gen)
        token = _PREPARED.set(self._queues(prompts, results))
        try:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        finally:
            _PREPARED.reset(token)

    async def abatch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        prompts = self._prepare(inputs)
        if prompts is None:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        guard = self.resolved_guard()
        gen = self._generation({k: v for k, v in kwargs.items() if k != "stop"})
        results = await guard.abatch(prompts, policy=self.call_policy(guard), **gen)
        token = _PREPARED.set(self._queues(prompts, results))
        try:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        finally:
            _PREPARED.reset(token)

    # ------------------------------------------------------------------ streaming, token by token
    # (BaseChatModel.stream reports each chunk to the callbacks; these only produce them)
    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        guard = self.resolved_guard()
        cutter = StopCut(stop or [])
        prompt = guard_messages(messages)
        stream = guard.stream(prompt, policy=self.call_policy(guard), **self._generation(kwargs))
        with closing(stream):  # leaving early (a stop sequence, a consumer's break) stops decoding
            for chunk in stream:
                if chunk.result is not None:
                    emit_llm(chunk.result.decision().to_dict(), run_manager)
                    report(run_manager, {"messages": prompt}, chunk.result.decision().to_dict(),
                           model=guard.backbone.name)
                    yield from self._tail(chunk.result, cutter)
                    return
                piece = cutter.push(chunk.text)
                if piece:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if cutter.done:
                    return

    def _tail(self, result: GuardResult, cutter: StopCut) -> Iterator[ChatGenerationChunk]:
        rest = cutter.flush()
        if rest:
            yield ChatGenerationChunk(message=AIMessageChunk(content=rest))
        last = self._message(result, "", chunk=True)
        last.chunk_position = "last"
        yield ChatGenerationChunk(message=last)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        guard = self.resolved_guard()
        cutter = StopCut(stop or [])
        prompt = guard_messages(messages)
        stream = guard.astream(prompt, policy=self.call_policy(guard), **self._generation(kwargs))
        async with aclosing(stream):
            async for chunk in stream:
                if chunk.result is not None:
                    await aemit_llm(chunk.result.decision().to_dict(), run_manager)
                    await areport(run_manager, {"messages": prompt}, chunk.result.decision().to_dict(),
                                  model=guard.backbone.name)
                    for out in self._tail(chunk.result, cutter):
                        yield out
                    return
                piece = cutter.push(chunk.text)
                if piece:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if cutter.done:
                    return
