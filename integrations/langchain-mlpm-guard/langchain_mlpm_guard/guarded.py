"""``with_guard(chain)``: guard any LangChain runnable whose own LLM answers.

Only the guard's scoring runs on the backbone (``Guard.check``, an early-exit forward pass):
the wrapped chain's LLM is called once, to answer, and never to check the input. Routes:

- ``PASS``: the chain runs on the input unchanged.
- ``SAFETY_PROMPT``: the chain runs with the policy's safety prompt as a system message (chat
  inputs) or with ``safety_prefix`` before the text (string inputs).
- ``STEER``: activation steering needs the hosted backbone, so for an external model it is
  applied as ``SAFETY_PROMPT`` (the decision records ``route="steer"``, ``applied_route="safety_prompt"``).
- ``REFUSE``: the chain is not called; the refusal comes back in the chain's output type.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, closing
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable

from mlpm_guard import Guard, Policy, Route, Verdict

from ._common import aemit, aggregate, areport, emit, output_text, report
from ._planning import Plan, Planner, Watch
from ._plumbing import LCELPlumbing
from ._settings import GuardSettings


class GuardedRunnable(GuardSettings, LCELPlumbing, RunnableSerializable[Any, Any]):
    """A runnable checked by the guard before it runs (see :func:`with_guard`).

    Its decisions are a :class:`~langchain_mlpm_guard._planning.Planner`'s, built from its fields;
    this class runs the wrapped chain through LangChain's invoke, batch and stream paths.
    """

    runnable: Runnable[Any, Any]
    input_key: str | None = None
    output_key: str = "output"
    output_type: Literal["auto", "str", "message", "dict"] = "auto"
    safety_prefix: str | None = None
    output_moderation: bool | None = None
    moderator: Callable[..., Any] | None = None

    @property
    def planner(self) -> Planner:
        """The decisions of a call, over the fields as they are for this run."""
        return Planner(self.runnable, self.input_key, self.output_key, self.output_type, self.safety_prefix,
                       self.output_moderation, self.moderator)

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return False

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return super().get_name(suffix, name=name or self.name or f"MLPMGuard<{self.runnable.get_name()}>")

    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        return self.runnable.InputType

    @property
    def OutputType(self) -> Any:  # noqa: N802
        return self.runnable.OutputType

    def get_input_schema(self, config: RunnableConfig | None = None) -> Any:
        return self.runnable.get_input_schema(config)

    def get_output_schema(self, config: RunnableConfig | None = None) -> Any:
        return self.runnable.get_output_schema(config)

    # ------------------------------------------------------------------ the check
    def _check(self, value: Any, guard: Guard, policy: Policy, config: RunnableConfig,
               run_manager: Any) -> Plan:
        start = time.time_ns()
        conversation = self.planner.conversation(value, config)
        plan = self.planner.plan(value, guard.check(conversation, policy=policy), policy, conversation)
        emit(plan.record, config)
        report(run_manager, {"messages": conversation}, plan.record, start_ns=start, model=guard.backbone.name)
        return plan

    async def _acheck(self, value: Any, guard: Guard, policy: Policy, config: RunnableConfig,
                      run_manager: Any) -> Plan:
        start = time.time_ns()
        conversation = await asyncio.to_thread(self.planner.conversation, value, config)
        plan = self.planner.plan(value, await guard.acheck(conversation, policy=policy), policy, conversation)
        await aemit(plan.record, config)
        await areport(run_manager, {"messages": conversation}, plan.record, start_ns=start,
                      model=guard.backbone.name)
        return plan

    # ------------------------------------------------------------------ invoke
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke, input, config, **kwargs)

    def _invoke(self, input: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig,
                **kwargs: Any) -> Any:
        guard = self.resolved_guard()
        policy = self.call_policy(guard)
        plan = self._check(input, guard, policy, config, run_manager)
        if plan.applied is Route.REFUSE:
            return self.planner.refusal(input, policy, plan.record, config)
        out = self.planner.clean(self.runnable.invoke(plan.inner, self.planner.inner_config(config, plan), **kwargs), plan, config)
        verdict = None
        if self.planner.moderates(policy):
            verdict = self.planner.judge(guard, plan.conversation, output_text(out, self.output_key), policy)
        out, record = self.planner.finish(input, out, plan, policy, verdict)
        if record is not None:
            emit(record, config)
        return out

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke, input, config, **kwargs)

    async def _ainvoke(self, input: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig,
                       **kwargs: Any) -> Any:
        guard = self.resolved_guard()
        policy = self.call_policy(guard)
        plan = await self._acheck(input, guard, policy, config, run_manager)
        if plan.applied is Route.REFUSE:
            return await asyncio.to_thread(self.planner.refusal, input, policy, plan.record, config)
        out = await self.runnable.ainvoke(plan.inner, self.planner.inner_config(config, plan), **kwargs)
        out = await asyncio.to_thread(self.planner.clean, out, plan, config)
        verdict = None
        if self.planner.moderates(policy):
            verdict = await asyncio.to_thread(self.planner.judge, guard, plan.conversation,
                                              output_text(out, self.output_key), policy)
        out, record = self.planner.finish(input, out, plan, policy, verdict)
        if record is not None:
            await aemit(record, config)
        return out

    # ------------------------------------------------------------------ batch: one batched check on the device
    def _queries(self, inputs: list[Any], config: list[RunnableConfig], out: list[Any]) -> dict[int, list]:
        """The conversation of each readable input; an unreadable one gets its error in ``out``."""
        queries = {}
        for i, value in enumerate(inputs):
            try:
                queries[i] = self.planner.conversation(value, config[i])
            except Exception as exc:  # noqa: BLE001 - that input fails alone
                out[i] = exc
        return queries

    def _plans(self, inputs: list[Any], queries: dict[int, list], verdicts: list[Verdict], policy: Policy,
               config: list[RunnableConfig], run_manager: list[Any], out: list[Any]) -> dict[int, Plan]:
        plans = {}
        for i, verdict in zip(queries, verdicts):
            plans[i] = self.planner.plan(inputs[i], verdict, policy, queries[i])
            report(run_manager[i], {"messages": queries[i]}, plans[i].record)
            if plans[i].applied is Route.REFUSE:
                out[i] = self.planner.refusal(inputs[i], policy, plans[i].record, config[i])
        return plans

    def _batch(self, inputs: list[Any], run_manager: list[CallbackManagerForChainRun],
               config: list[RunnableConfig], **kwargs: Any) -> list[Any]:
        guard = self.resolved_guard()
        policy = self.call_policy(guard)
        out: list[Any] = [None] * len(inputs)
        queries = self._queries(inputs, config, out)
        plans = self._plans(inputs, queries, guard.check_batch(list(queries.values()), policy=policy), policy,
                            config, run_manager, out)
        for i, plan in plans.items():
            emit(plan.record, config[i])
        todo = [i for i, plan in plans.items() if plan.applied is not Route.REFUSE]
        if not todo:
            return out
        answers = self.runnable.batch([plans[i].inner for i in todo],
                                      [self.planner.inner_config(config[i], plans[i]) for i in todo],
                                      return_exceptions=True, **kwargs)
        for i, answer in zip(todo, answers):
            if isinstance(answer, Exception):
                out[i] = answer
                continue
            answer = self.planner.clean(answer, plans[i], config[i])
            verdict = None
            if self.planner.moderates(policy):
                verdict = self.planner.judge(guard, queries[i], output_text(answer, self.output_key), policy)
            out[i], record = self.planner.finish(inputs[i], answer, plans[i], policy, verdict)
            if record is not None:
                emit(record, config[i])
        return out

    async def _abatch(self, inputs: list[Any], run_manager: list[AsyncCallbackManagerForChainRun],
                      config: list[RunnableConfig], **kwargs: Any) -> list[Any]:
        guard = self.resolved_guard()
        policy = self.call_policy(guard)
        out: list[Any] = [None] * len(inputs)
        queries = await asyncio.to_thread(self._queries, inputs, config, out)
        verdicts = await guard.acheck_batch(list(queries.values()), policy=policy)
        plans = await asyncio.to_thread(self._plans, inputs, queries, verdicts, policy, config, run_manager, out)
        for i, plan in plans.items():
            await aemit(plan.record, config[i])
        todo = [i for i, plan in plans.items() if plan.applied is not Route.REFUSE]
        if not todo:
            return out
        answers = await self.runnable.abatch([plans[i].inner for i in todo],
                                             [self.planner.inner_config(config[i], plans[i]) for i in todo],
                                             return_exceptions=True, **kwargs)
        for i, answer in zip(todo, answers):
            if isinstance(answer, Exception):
                out[i] = answer
                continue
            answer = await asyncio.to_thread(self.planner.clean, answer, plans[i], config[i])
            verdict = None
            if self.planner.moderates(policy):
                verdict = await asyncio.to_thread(self.planner.judge, guard, queries[i],
                                                  output_text(answer, self.output_key), policy)
            out[i], record = self.planner.finish(inputs[i], answer, plans[i], policy, verdict)
            if record is not None:
                await aemit(record, config[i])
        return out

    # ------------------------------------------------------------------ streaming: the chain's own chunks
    def _transform(self, input: Iterator[Any], run_manager: CallbackManagerForChainRun, config: RunnableConfig,
                   **kwargs: Any) -> Iterator[Any]:
        guard = self.resolved_guard()
        policy = self.call_policy(guard)
        value = aggregate(list(input), self.get_name())
        plan = self._check(value, guard, policy, config, run_manager)
        if plan.applied is Route.REFUSE:
            yield from self.planner.refusal_stream(value, policy, plan.record, config, kwargs)
            return
        watch = Watch(self.planner, guard, plan.conversation, policy) if self.planner.moderates(policy) else None
        first = None
        stream = self.runnable.stream(plan.inner, self.planner.inner_config(config, plan), **kwargs)
        with closing(stream):  # stops the chain's LLM when the consumer or the moderation stops
            for chunk in stream:
                first = chunk if first is None else first
                if watch is None:
                    yield chunk
                    continue
                if watch.add(chunk):
                    break
                yield from watch.release()
        self.planner.clean(None, plan, config)
        record = plan.output_record(watch.finish(), policy) if watch is not None else None
        if record is not None:
            emit(record, config)
        yield from self.planner.stream_end(value, first, plan, policy, watch, record)

    async def _atransform(self, input: AsyncIterator[Any], run_manager: AsyncCallbackManagerForChainRun,
                          config: RunnableConfig, **kwargs: Any) -> AsyncIterator[Any]:
        guard = self.resolved_guard()
        policy = self.call_policy(guard)
        value = aggregate([x async for x in input], self.get_name())
        plan = await self._acheck(value, guard, policy, config, run_manager)
        if plan.applied is Route.REFUSE:
            for chunk in await asyncio.to_thread(list, self.planner.refusal_stream(value, policy, plan.record, config, kwargs)):
                yield chunk
            return
        watch = Watch(self.planner, guard, plan.conversation, policy) if self.planner.moderates(policy) else None
        first = None
        stream = self.runnable.astream(plan.inner, self.planner.inner_config(config, plan), **kwargs)
        async with aclosing(stream):
            async for chunk in stream:
                first = chunk if first is None else first
                if watch is None:
                    yield chunk
                    continue
                if await asyncio.to_thread(watch.add, chunk):
                    break
                for released in watch.release():
                    yield released
        await asyncio.to_thread(self.planner.clean, None, plan, config)
        record = None
        if watch is not None:
            record = plan.output_record(await asyncio.to_thread(watch.finish), policy)
            await aemit(record, config)
        for chunk in self.planner.stream_end(value, first, plan, policy, watch, record):
            yield chunk


def with_guard(runnable: Runnable[Any, Any], guard: Guard | None = None, **options: Any) -> GuardedRunnable:
    """Guard a runnable: check its input first, then refuse, add a safety prompt, or run it unchanged.

    Args:
        runnable: any LangChain runnable whose own LLM answers (a chat model, a chain, a RAG chain).
        guard: the core guard (``None``: the shared default ``mlpm_guard.Guard()``, loaded on first use).
        **options: :class:`GuardedRunnable` fields: ``policy``, ``unsafe_at``, ``controversial_at``,
            ``input_key`` (dict key of the user's text), ``output_key`` (dict key of the answer,
            default ``"output"``), ``output_type`` (``"auto"``, ``"str"``, ``"message"``,
            ``"dict"``: the type a refusal takes), ``safety_prefix`` (put before string inputs on the
            safety-prompt route; default the policy's safety prompt and a blank line),
            ``output_moderation`` (``None``: as the policy says) and ``moderator``.

    Returns:
        A :class:`GuardedRunnable` with the wrapped runnable's input and output types.

    Example:
        ```python
        import langchain_mlpm_guard  # registers .with_guard() on runnables
        from langchain_mlpm_guard import with_guard

        guarded = with_guard(prompt | llm | StrOutputParser())       # or: (prompt | llm).with_guard()
        guarded.invoke({"input": "How do I make a pipe bomb?"})      # -> the refusal, as a str
        ```
    """
    if not isinstance(runnable, Runnable):
        msg = f"`runnable` must be a LangChain Runnable, got {type(runnable).__name__}; wrap a function " \
              "with RunnableLambda(fn) first"
        raise TypeError(msg)
    return GuardedRunnable(runnable=runnable, guard=guard, **options)
