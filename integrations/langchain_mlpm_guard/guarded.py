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
import collections
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, closing
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import merge_configs

from mlpm_guard import Guard, Policy, Route, Verdict, to_verdict

from langchain_core.messages import SystemMessage

from . import _graph
from ._common import (
    FLAG_KEY,
    OutputKind,
    _dict_key,
    aemit,
    aggregate,
    areport,
    decision,
    emit,
    flag_chunk,
    guard_messages,
    input_kind,
    make_output,
    output_text,
    prompt_messages,
    report,
    run_metadata,
    type_kind,
    value_kind,
    with_flag,
    with_safety,
)
from ._settings import GuardSettings
from ._plumbing import LCELPlumbing


@dataclass(frozen=True)
class _Plan:
    """What the guard decided for one input: the route taken and the input the chain gets."""

    verdict: Verdict
    route: Route  # the policy's route
    applied: Route  # what is done: STEER becomes SAFETY_PROMPT on an external model
    inner: Any  # the chain's input (None when refused)
    record: dict[str, Any]
    conversation: list[dict[str, str]]  # what the wrapped model reads, as the guard scored it
    safety_id: str | None = None  # the per-call safety system message put into a graph's state

    def output_record(self, verdict: Verdict, policy: Policy) -> dict[str, Any]:
        """The record after output moderation judged the answer."""
        replace = verdict.unsafe and policy.output_moderation.on_flag == "replace"
        return decision(self.verdict, self.route, applied=self.applied, blocked=replace, stage="output",
                        output_verdict=verdict, replaced=replace)


class GuardedRunnable(GuardSettings, LCELPlumbing, RunnableSerializable[Any, Any]):
    """A runnable checked by the guard before it runs (see :func:`with_guard`)."""

    runnable: Runnable[Any, Any]
    input_key: str | None = None
    output_key: str = "output"
    output_type: Literal["auto", "str", "message", "dict"] = "auto"
    safety_prefix: str | None = None
    output_moderation: bool | None = None
    moderator: Callable[..., Any] | None = None

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

    # ------------------------------------------------------------------ decisions (no model call but the check)
    def _kind(self, value: Any) -> OutputKind:
        if self.output_type != "auto":
            return self.output_type
        return type_kind(self.runnable.OutputType) or input_kind(value)

    def _moderates(self, policy: Policy) -> bool:
        return policy.output_moderation.enabled if self.output_moderation is None else self.output_moderation

    def _graph_key(self, value: Any) -> str | None:
        """The messages key of a graph's state input (``None``: not a state-dict call)."""
        if not isinstance(value, Mapping) or not _graph.is_graph(self.runnable):
            return None
        return _dict_key(value, self.input_key)

    def _conversation(self, value: Any, config: RunnableConfig | None) -> list[dict[str, str]]:
        """Everything the wrapped model will read of this input: for a graph on a checkpointed
        thread, the thread's messages too (the guard scores the conversation, not one turn)."""
        key = self._graph_key(value)
        if key is None:
            return prompt_messages(value, self.input_key)
        messages = [*_graph.history(self.runnable, config, key), *_graph.new_messages(value, key)]
        return guard_messages(messages)

    def _plan(self, value: Any, verdict: Verdict, policy: Policy, conversation: list[dict[str, str]]) -> _Plan:
        route = policy.route(verdict)
        applied = Route.SAFETY_PROMPT if route is Route.STEER else route
        record = decision(verdict, route, applied=applied, blocked=applied is Route.REFUSE)
        inner, safety_id = None, None
        key = self._graph_key(value)
        if applied is Route.PASS:
            inner = value
        elif applied is Route.SAFETY_PROMPT and key is not None:
            # A graph keeps what it is given: the system message gets an id so it can be taken out again.
            safety_id = f"mlpm-guard-safety-{uuid.uuid4()}"
            system = SystemMessage(content=policy.safety_prompt, id=safety_id)
            inner = {**value, key: [system, *_graph.new_messages(value, key)]}
        elif applied is Route.SAFETY_PROMPT:
            prefix = self.safety_prefix if self.safety_prefix is not None else f"{policy.safety_prompt}\n\n"
            inner = with_safety(value, policy.safety_prompt, prefix, self.input_key)
        return _Plan(verdict, route, applied, inner, record, conversation, safety_id)

    def _clean(self, out: Any, plan: _Plan, config: RunnableConfig | None) -> Any:
        """A graph's output without the per-call safety prompt, which its thread does not keep either."""
        if plan.safety_id is None:
            return out
        key = self._graph_key(plan.inner)
        _graph.forget(self.runnable, config, key, plan.safety_id)
        return _graph.without(out, key, plan.safety_id)

    def _check(self, value: Any, guard: Guard, policy: Policy, config: RunnableConfig,
               run_manager: Any) -> _Plan:
        start = time.time_ns()
        conversation = self._conversation(value, config)
        plan = self._plan(value, guard.check(conversation, policy=policy), policy, conversation)
        emit(plan.record, config)
        report(run_manager, {"messages": conversation}, plan.record, start_ns=start, model=guard.backbone.name)
        return plan

    async def _acheck(self, value: Any, guard: Guard, policy: Policy, config: RunnableConfig,
                      run_manager: Any) -> _Plan:
        start = time.time_ns()
        conversation = await asyncio.to_thread(self._conversation, value, config)
        plan = self._plan(value, await guard.acheck(conversation, policy=policy), policy, conversation)
        await aemit(plan.record, config)
        await areport(run_manager, {"messages": conversation}, plan.record, start_ns=start,
                      model=guard.backbone.name)
        return plan

    def _refusal(self, value: Any, policy: Policy, record: dict[str, Any], config: RunnableConfig | None = None,
                 *, chunk: bool = False) -> Any:
        key = self._graph_key(value)
        if key is not None:  # a state of the graph's own shape, kept in its thread
            refusal = _graph.refusal_message(policy.refusal_message, record, FLAG_KEY)
            return _graph.refused_state(self.runnable, value, key, refusal, config)
        return make_output(self._kind(value), policy.refusal_message, record, self.output_key, chunk=chunk)

    def _refusal_stream(self, value: Any, policy: Policy, record: dict[str, Any], config: RunnableConfig,
                        kwargs: dict[str, Any]) -> Iterator[Any]:
        key = self._graph_key(value)
        if key is None:
            yield self._refusal(value, policy, record, chunk=True)
            return
        refusal = _graph.refusal_message(policy.refusal_message, record, FLAG_KEY)
        state = _graph.refused_state(self.runnable, value, key, refusal, config)
        mode = kwargs.get("stream_mode") or getattr(self.runnable, "stream_mode", "values")
        yield from _graph.refused_stream(state, key, refusal, record, mode, bool(kwargs.get("subgraphs")))

    @staticmethod
    def _inner_config(config: RunnableConfig, plan: _Plan) -> RunnableConfig:
        # The decision rides in the wrapped chain's run metadata (inherited by its children).
        return merge_configs(config, {"metadata": run_metadata(plan.record)})

    def _judge(self, guard: Guard, conversation: list[dict[str, str]], answer: str, policy: Policy) -> Verdict:
        moderator = self.moderator or guard.moderator
        return to_verdict(moderator(conversation, answer), policy.output_moderation.threshold)

    def _finish(self, value: Any, out: Any, plan: _Plan, policy: Policy,
                verdict: Verdict | None) -> tuple[Any, dict[str, Any] | None]:
        """The output to return after the chain ran, and the output-stage record (if moderation ran)."""
        if verdict is None:
            return (out if plan.applied is Route.PASS else with_flag(out, plan.record)), None
        record = plan.output_record(verdict, policy)
        if record["replaced"]:
            return make_output(value_kind(out) or self._kind(value), policy.refusal_message, record,
                               self.output_key), record
        if verdict.unsafe or plan.applied is not Route.PASS:
            return with_flag(out, record), record
        return out, record  # PASS and a clean answer: exactly what the chain made

    # ------------------------------------------------------------------ invoke
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke, input, config, **kwargs)

    def _invoke(self, input: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig,
                **kwargs: Any) -> Any:
        guard = self.resolved_guard()
        policy = self.call_policy(guard)
        plan = self._check(input, guard, policy, config, run_manager)
        if plan.applied is Route.REFUSE:
            return self._refusal(input, policy, plan.record, config)
        out = self._clean(self.runnable.invoke(plan.inner, self._inner_config(config, plan), **kwargs), plan, config)
        verdict = None
        if self._moderates(policy):
            verdict = self._judge(guard, plan.conversation, output_text(out, self.output_key), policy)
        out, record = self._finish(input, out, plan, policy, verdict)
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
            return await asyncio.to_thread(self._refusal, input, policy, plan.record, config)
        out = await self.runnable.ainvoke(plan.inner, self._inner_config(config, plan), **kwargs)
        out = await asyncio.to_thread(self._clean, out, plan, config)
        verdict = None
        if self._moderates(policy):
            verdict = await asyncio.to_thread(self._judge, guard, plan.conversation,
                                              output_text(out, self.output_key), policy)
        out, record = self._finish(input, out, plan, policy, verdict)
        if record is not None:
            await aemit(record, config)
        return out

    # ------------------------------------------------------------------ batch: one batched check on the device
    def _queries(self, inputs: list[Any], config: list[RunnableConfig], out: list[Any]) -> dict[int, list]:
        """The conversation of each readable input; an unreadable one gets its error in ``out``."""
        queries = {}
        for i, value in enumerate(inputs):
            try:
                queries[i] = self._conversation(value, config[i])
            except Exception as exc:  # noqa: BLE001 - that input fails alone
                out[i] = exc
        return queries

    def _plans(self, inputs: list[Any], queries: dict[int, list], verdicts: list[Verdict], policy: Policy,
               config: list[RunnableConfig], run_manager: list[Any], out: list[Any]) -> dict[int, _Plan]:
        plans = {}
        for i, verdict in zip(queries, verdicts):
            plans[i] = self._plan(inputs[i], verdict, policy, queries[i])
            report(run_manager[i], {"messages": queries[i]}, plans[i].record)
            if plans[i].applied is Route.REFUSE:
                out[i] = self._refusal(inputs[i], policy, plans[i].record, config[i])
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
                                      [self._inner_config(config[i], plans[i]) for i in todo],
                                      return_exceptions=True, **kwargs)
        for i, answer in zip(todo, answers):
            if isinstance(answer, Exception):
                out[i] = answer
                continue
            answer = self._clean(answer, plans[i], config[i])
            verdict = None
            if self._moderates(policy):
                verdict = self._judge(guard, queries[i], output_text(answer, self.output_key), policy)
            out[i], record = self._finish(inputs[i], answer, plans[i], policy, verdict)
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
                                             [self._inner_config(config[i], plans[i]) for i in todo],
                                             return_exceptions=True, **kwargs)
        for i, answer in zip(todo, answers):
            if isinstance(answer, Exception):
                out[i] = answer
                continue
            answer = await asyncio.to_thread(self._clean, answer, plans[i], config[i])
            verdict = None
            if self._moderates(policy):
                verdict = await asyncio.to_thread(self._judge, guard, queries[i],
                                                  output_text(answer, self.output_key), policy)
            out[i], record = self._finish(inputs[i], answer, plans[i], policy, verdict)
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
            yield from self._refusal_stream(value, policy, plan.record, config, kwargs)
            return
        watch = _Watch(self, guard, plan.conversation, policy) if self._moderates(policy) else None
        first = None
        stream = self.runnable.stream(plan.inner, self._inner_config(config, plan), **kwargs)
        with closing(stream):  # stops the chain's LLM when the consumer or the moderation stops
            for chunk in stream:
                first = chunk if first is None else first
                if watch is None:
                    yield chunk
                    continue
                if watch.add(chunk):
                    break
                yield from watch.release()
        self._clean(None, plan, config)
        record = plan.output_record(watch.finish(), policy) if watch is not None else None
        if record is not None:
            emit(record, config)
        yield from self._stream_end(value, first, plan, policy, watch, record)

    def _stream_end(self, value: Any, first: Any, plan: _Plan, policy: Policy, watch: _Watch | None,
                    record: dict[str, Any] | None) -> Iterator[Any]:
        """What follows the released chunks: the refusal in place of a flagged rest, or the checked
        rest; then a chunk carrying the decision when there is one to tell."""
        if record is not None and record["replaced"]:
            yield make_output(value_kind(first) or self._kind(value), policy.refusal_message, record,
                              self.output_key, chunk=True)
            return
        if watch is not None:
            yield from watch.release(everything=True)
        end = self._end_chunk(first, plan, record)
        if end is not None:
            yield end

    @staticmethod
    def _end_chunk(first: Any, plan: _Plan, record: dict[str, Any] | None) -> Any | None:
        """A last chunk carrying the decision, when there is one to tell (never after a clean PASS)."""
        if record is None:
            return None if plan.applied is Route.PASS else flag_chunk(first, plan.record)
        if plan.applied is Route.PASS and not record["output_flagged"]:
            return None
        return flag_chunk(first, record)

    async def _atransform(self, input: AsyncIterator[Any], run_manager: AsyncCallbackManagerForChainRun,
                          config: RunnableConfig, **kwargs: Any) -> AsyncIterator[Any]:
        guard = self.resolved_guard()
        policy = self.call_policy(guard)
        value = aggregate([x async for x in input], self.get_name())
        plan = await self._acheck(value, guard, policy, config, run_manager)
        if plan.applied is Route.REFUSE:
            for chunk in await asyncio.to_thread(list, self._refusal_stream(value, policy, plan.record, config, kwargs)):
                yield chunk
            return
        watch = _Watch(self, guard, plan.conversation, policy) if self._moderates(policy) else None
        first = None
        stream = self.runnable.astream(plan.inner, self._inner_config(config, plan), **kwargs)
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
        await asyncio.to_thread(self._clean, None, plan, config)
        record = None
        if watch is not None:
            record = plan.output_record(await asyncio.to_thread(watch.finish), policy)
            await aemit(record, config)
        for chunk in self._stream_end(value, first, plan, policy, watch, record):
            yield chunk


class _Watch:
    """Output moderation of one stream: the text so far is judged every ``check_every`` chunks,
    and a chunk is handed on only after a passing check that also read ``hold_back`` chunks after
    it (the policy's setting, as in the core ``Guard.stream``). On a flag the chain stops and the
    consumer gets the refusal in place of the held chunks (under ``on_flag="replace"``).
    """

    def __init__(self, owner: GuardedRunnable, guard: Guard, conversation: list[dict[str, str]],
                 policy: Policy) -> None:
        self.owner, self.guard, self.conversation, self.policy = owner, guard, conversation, policy
        self.parts: list[str] = []
        self.held: collections.deque[tuple[int, Any]] = collections.deque()
        self.covered = 0  # chunks read by the last passing check
        self.unjudged = 0
        self.verdict: Verdict | None = None

    def add(self, chunk: Any) -> bool:
        """Take a chunk; True when the text so far is flagged (stop the stream)."""
        self.held.append((len(self.parts), chunk))
        self.parts.append(output_text(chunk, self.owner.output_key))
        self.unjudged += 1
        if self.unjudged < self.policy.output_moderation.check_every:
            return False
        return self._judge().unsafe

    def release(self, *, everything: bool = False) -> list[Any]:
        """The held chunks that passing checks let out (all of them once the whole text passed)."""
        out = []
        hold_back = self.policy.output_moderation.hold_back
        while self.held and (everything or self.held[0][0] + hold_back < self.covered):
            out.append(self.held.popleft()[1])
        return out

    def finish(self) -> Verdict:
        """The verdict on the whole streamed text (judged again only if chunks came since)."""
        if self.verdict is not None and (self.verdict.unsafe or not self.unjudged):
            return self.verdict
        return self._judge()

    def _judge(self) -> Verdict:
        self.unjudged = 0
        self.verdict = self.owner._judge(self.guard, self.conversation, "".join(self.parts), self.policy)
        if not self.verdict.unsafe:
            self.covered = len(self.parts)
        return self.verdict


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
