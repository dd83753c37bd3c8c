"""``MLPMGuardRunnable``: the guarded backbone itself as an LCEL runnable.

The core :class:`~mlpm_guard.Guard` scores the prompt from the backbone's own prefill, routes it
(refuse / safety prompt / steer / pass), answers and moderates; this class only translates
LangChain inputs and outputs and reports the decision.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import Field

from mlpm_guard import GuardResult

from ._common import (
    FLAG_KEY,
    GuardedText,
    aemit,
    aggregate,
    areport,
    emit,
    prompt_messages,
    report,
)
from ._settings import GuardSettings
from ._plumbing import LCELPlumbing


def usage(result: GuardResult) -> dict[str, int]:
    t = result.timings
    return {"input_tokens": t.prompt_tokens, "output_tokens": t.completion_tokens,
            "total_tokens": t.prompt_tokens + t.completion_tokens}


class MLPMGuardRunnable(GuardSettings, LCELPlumbing, RunnableSerializable[Any, Any]):
    """Answer prompts with the guarded hosted backbone.

    Input: a ``str``, a list of messages, a ``PromptValue``, or a dict holding one of them under
    ``input_key``. Output: an ``AIMessage`` whose ``response_metadata["mlpm_guard"]`` holds the
    decision (or a ``str`` with ``output="str"``). ``stream`` yields the answer token by token;
    ``batch`` scores all prompts in one batched prefill (``Guard.batch``).

    Args:
        guard: the core guard (``None``: the shared default ``mlpm_guard.Guard()``).
        policy: a policy replacing the guard's for this runnable.
        unsafe_at / controversial_at: thresholds over the policy's (expose them with
            ``configurable_fields`` to change them per run).
        output: ``"message"`` (``AIMessage``) or ``"str"``.
        input_key: the dict key of the prompt (default: the first of input, question, query, messages).
        max_new_tokens / temperature: decoding overrides (``None``: the guard's).

    Example:
        ```python
        from langchain_core.prompts import ChatPromptTemplate
        from langchain_mlpm_guard import MLPMGuardRunnable

        chain = ChatPromptTemplate.from_template("{input}") | MLPMGuardRunnable(max_new_tokens=64)
        chain.invoke({"input": "Write a haiku about tea"}).content
        ```
    """

    output: Literal["message", "str"] = "message"
    input_key: str | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return False  # it holds a live model

    def _generation(self) -> dict[str, Any]:
        return {k: v for k, v in (("max_new_tokens", self.max_new_tokens), ("temperature", self.temperature))
                if v is not None}

    def _shape(self, result: GuardResult) -> Any:
        record = result.decision().to_dict()
        if self.output == "str":
            return GuardedText(result.text, record)
        return AIMessage(content=result.text, response_metadata={FLAG_KEY: record}, usage_metadata=usage(result))

    # ------------------------------------------------------------------ one prompt
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke, input, config, **kwargs)

    def _invoke(self, input: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig,
                **kwargs: Any) -> Any:
        guard = self.resolved_guard()
        prompt = prompt_messages(input, self.input_key)
        result = guard.invoke(prompt, policy=self.call_policy(guard), **{**self._generation(), **kwargs})
        emit(result.decision().to_dict(), config)
        report(run_manager, {"messages": prompt}, result.decision().to_dict(), model=guard.backbone.name)
        return self._shape(result)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke, input, config, **kwargs)

    async def _ainvoke(self, input: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig,
                       **kwargs: Any) -> Any:
        guard = self.resolved_guard()
        prompt = prompt_messages(input, self.input_key)
        result = await guard.ainvoke(prompt, policy=self.call_policy(guard), **{**self._generation(), **kwargs})
        await aemit(result.decision().to_dict(), config)
        await areport(run_manager, {"messages": prompt}, result.decision().to_dict(), model=guard.backbone.name)
        return self._shape(result)

    # ------------------------------------------------------------------ many prompts, one batched prefill
    def _prompts(self, inputs: list[Any]) -> tuple[list[Any], list[int]]:
        """Each input's messages (or the error reading it) and the indices of the readable ones."""
        prompts: list[Any] = []
        ok: list[int] = []
        for i, value in enumerate(inputs):
            try:
                prompts.append(prompt_messages(value, self.input_key))
                ok.append(i)
            except Exception as exc:  # noqa: BLE001 - reported for that input only
                prompts.append(exc)
        return prompts, ok

    def _batch(self, inputs: list[Any], run_manager: list[CallbackManagerForChainRun],
               config: list[RunnableConfig], **kwargs: Any) -> list[Any]:
        guard = self.resolved_guard()
        prompts, ok = self._prompts(inputs)
        results = guard.batch([prompts[i] for i in ok], policy=self.call_policy(guard),
                              **{**self._generation(), **kwargs})
        out: list[Any] = list(prompts)
        for i, result in zip(ok, results):
            emit(result.decision().to_dict(), config[i])
            report(run_manager[i], {"messages": prompts[i]}, result.decision().to_dict(),
                   model=guard.backbone.name)
            out[i] = self._shape(result)
        return out

    async def _abatch(self, inputs: list[Any], run_manager: list[AsyncCallbackManagerForChainRun],
                      config: list[RunnableConfig], **kwargs: Any) -> list[Any]:
        guard = self.resolved_guard()
        prompts, ok = self._prompts(inputs)
        results = await guard.abatch([prompts[i] for i in ok], policy=self.call_policy(guard),
                                     **{**self._generation(), **kwargs})
        out: list[Any] = list(prompts)
        for i, result in zip(ok, results):
            await aemit(result.decision().to_dict(), config[i])
            await areport(run_manager[i], {"messages": prompts[i]}, result.decision().to_dict(),
                          model=guard.backbone.name)
            out[i] = self._shape(result)
        return out

    # ------------------------------------------------------------------ streaming, token by token
    def _piece(self, text: str) -> Any:
        return text if self.output == "str" else AIMessageChunk(content=text)

    def _last(self, result: GuardResult) -> Any:
        record = result.decision().to_dict()
        if self.output == "str":
            return GuardedText("", record)
        return AIMessageChunk(content="", response_metadata={FLAG_KEY: record}, usage_metadata=usage(result),
                              chunk_position="last")

    def _transform(self, input: Iterator[Any], run_manager: CallbackManagerForChainRun, config: RunnableConfig,
                   **kwargs: Any) -> Iterator[Any]:
        guard = self.resolved_guard()
        prompt = prompt_messages(aggregate(list(input), type(self).__name__), self.input_key)
        stream = guard.stream(prompt, policy=self.call_policy(guard), **{**self._generation(), **kwargs})
        with closing(stream):  # a consumer that stops early stops generation too
            for chunk in stream:
                if chunk.text:
                    yield self._piece(chunk.text)
                if chunk.result is not None:
                    emit(chunk.result.decision().to_dict(), config)
                    report(run_manager, {"messages": prompt}, chunk.result.decision().to_dict(),
                           model=guard.backbone.name)
                    yield self._last(chunk.result)

    async def _atransform(self, input: AsyncIterator[Any], run_manager: AsyncCallbackManagerForChainRun,
                          config: RunnableConfig, **kwargs: Any) -> AsyncIterator[Any]:
        guard = self.resolved_guard()
        prompt = prompt_messages(aggregate([x async for x in input], type(self).__name__), self.input_key)
        stream = guard.astream(prompt, policy=self.call_policy(guard), **{**self._generation(), **kwargs})
        async with aclosing(stream):
            async for chunk in stream:
                if chunk.text:
                    yield self._piece(chunk.text)
                if chunk.result is not None:
                    await aemit(chunk.result.decision().to_dict(), config)
                    await areport(run_manager, {"messages": prompt}, chunk.result.decision().to_dict(),
                                  model=guard.backbone.name)
                    yield self._last(chunk.result)
