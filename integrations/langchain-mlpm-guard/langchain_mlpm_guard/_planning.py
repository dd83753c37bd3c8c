"""What :func:`~langchain_mlpm_guard.with_guard` decides for one input, and the outputs that carry
the decision: no model call here but the guard's check and the output moderation's judge.

:class:`Planner` holds the settings of a guarded runnable and turns a verdict into a :class:`Plan`
(the route taken and the input the wrapped chain gets), a refusal of the chain's own output type,
or the chain's output with the decision attached; :class:`Watch` moderates one output stream.
``GuardedRunnable`` (``guarded.py``) runs the wrapped chain through LangChain's call paths.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import SystemMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import merge_configs

from mlpm_guard import Decision, Guard, Policy, Route, Verdict
from mlpm_guard.guardrail import external
from mlpm_guard.guardrail.streaming import OutputWatch

from . import _graph
from ._common import (
    FLAG_KEY,
    OutputKind,
    dict_key,
    flag_chunk,
    guard_messages,
    input_kind,
    make_output,
    output_text,
    prompt_messages,
    run_metadata,
    type_kind,
    value_kind,
    with_flag,
    with_safety,
)


@dataclass(frozen=True)
class Plan:
    """What the guard decided for one input: the route taken and the input the chain gets."""

    verdict: Verdict
    route: Route  # the policy's route
    applied: Route  # what is done: STEER becomes SAFETY_PROMPT on an external model
    inner: Any  # the chain's input (None when refused)
    record: dict[str, Any]
    conversation: list[dict[str, str]]  # what the wrapped model reads, as the guard scored it
    safety_id: str | None = None  # the per-call safety system message put into a graph's state

    @property
    def decision(self) -> Decision:
        """The input decision this plan carries out."""
        return Decision(self.route, blocked=self.applied is Route.REFUSE, verdict=self.verdict,
                        applied_route=self.applied)

    def output_record(self, verdict: Verdict, policy: Policy) -> dict[str, Any]:
        """The record after output moderation judged the answer."""
        return external.answered(self.decision, verdict, policy, stage="output").to_dict()


@dataclass(frozen=True)
class Planner:
    """The decisions of a guarded runnable (see :func:`~langchain_mlpm_guard.with_guard`), over
    the settings that shape them; ``GuardedRunnable`` builds one from its fields for each call."""

    runnable: Runnable[Any, Any]
    input_key: str | None = None
    output_key: str = "output"
    output_type: Literal["auto", "str", "message", "dict"] = "auto"
    safety_prefix: str | None = None
    output_moderation: bool | None = None
    moderator: Callable[..., Any] | None = None

    def kind(self, value: Any) -> OutputKind:
        if self.output_type != "auto":
            return self.output_type
        return type_kind(self.runnable.OutputType) or input_kind(value)

    def moderates(self, policy: Policy) -> bool:
        return policy.output_moderation.enabled if self.output_moderation is None else self.output_moderation

    def graph_key(self, value: Any) -> str | None:
        """The messages key of a graph's state input (``None``: not a state-dict call)."""
        if not isinstance(value, Mapping) or not _graph.is_graph(self.runnable):
            return None
        return dict_key(value, self.input_key)

    def conversation(self, value: Any, config: RunnableConfig | None) -> list[dict[str, str]]:
        """Everything the wrapped model will read of this input: for a graph on a checkpointed
        thread, the thread's messages too (the guard scores the conversation, not one turn)."""
        key = self.graph_key(value)
        if key is None:
            return prompt_messages(value, self.input_key)
        messages = [*_graph.history(self.runnable, config, key), *_graph.new_messages(value, key)]
        return guard_messages(messages)

    def plan(self, value: Any, verdict: Verdict, policy: Policy, conversation: list[dict[str, str]]) -> Plan:
        decision = external.decide(verdict, policy)
        route, applied, record = decision.route, decision.applied_route, decision.to_dict()
        inner, safety_id = None, None
        key = self.graph_key(value)
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
        return Plan(verdict, route, applied, inner, record, conversation, safety_id)

    def clean(self, out: Any, plan: Plan, config: RunnableConfig | None) -> Any:
        """A graph's output without the per-call safety prompt, which its thread does not keep either."""
        if plan.safety_id is None:
            return out
        key = self.graph_key(plan.inner)
        _graph.forget(self.runnable, config, key, plan.safety_id)
        return _graph.without(out, key, plan.safety_id)

    def refusal(self, value: Any, policy: Policy, record: dict[str, Any], config: RunnableConfig | None = None,
                 *, chunk: bool = False) -> Any:
        key = self.graph_key(value)
        if key is not None:  # a state of the graph's own shape, kept in its thread
            refusal = _graph.refusal_message(policy.refusal_message, record, FLAG_KEY)
            return _graph.refused_state(self.runnable, value, key, refusal, config)
        return make_output(self.kind(value), policy.refusal_message, record, self.output_key, chunk=chunk)

    def refusal_stream(self, value: Any, policy: Policy, record: dict[str, Any], config: RunnableConfig,
                        kwargs: dict[str, Any]) -> Iterator[Any]:
        key = self.graph_key(value)
        if key is None:
            yield self.refusal(value, policy, record, chunk=True)
            return
        refusal = _graph.refusal_message(policy.refusal_message, record, FLAG_KEY)
        state = _graph.refused_state(self.runnable, value, key, refusal, config)
        mode = kwargs.get("stream_mode") or getattr(self.runnable, "stream_mode", "values")
        yield from _graph.refused_stream(state, key, refusal, record, mode, bool(kwargs.get("subgraphs")))

    @staticmethod
    def inner_config(config: RunnableConfig, plan: Plan) -> RunnableConfig:
        # The decision rides in the wrapped chain's run metadata (inherited by its children).
        return merge_configs(config, {"metadata": run_metadata(plan.record)})

    def judge(self, guard: Guard, conversation: list[dict[str, str]], answer: str, policy: Policy) -> Verdict:
        return guard.check_answer(conversation, answer, policy=policy, moderator=self.moderator)

    def finish(self, value: Any, out: Any, plan: Plan, policy: Policy,
                verdict: Verdict | None) -> tuple[Any, dict[str, Any] | None]:
        """The output to return after the chain ran, and the output-stage record (if moderation ran)."""
        if verdict is None:
            return (out if plan.applied is Route.PASS else with_flag(out, plan.record)), None
        record = plan.output_record(verdict, policy)
        if record["replaced"]:
            return make_output(value_kind(out) or self.kind(value), policy.refusal_message, record,
                               self.output_key), record
        if verdict.unsafe or plan.applied is not Route.PASS:
            return with_flag(out, record), record
        return out, record  # PASS and a clean answer: exactly what the chain made

    def stream_end(self, value: Any, first: Any, plan: Plan, policy: Policy, watch: Watch | None,
                    record: dict[str, Any] | None) -> Iterator[Any]:
        """What follows the released chunks: the refusal in place of a flagged rest, or the checked
        rest; then a chunk carrying the decision when there is one to tell."""
        if record is not None and record["replaced"]:
            yield make_output(value_kind(first) or self.kind(value), policy.refusal_message, record,
                              self.output_key, chunk=True)
            return
        if watch is not None:
            yield from watch.release(everything=True)
        end = self.end_chunk(first, plan, record)
        if end is not None:
            yield end

    @staticmethod
    def end_chunk(first: Any, plan: Plan, record: dict[str, Any] | None) -> Any | None:
        """A last chunk carrying the decision, when there is one to tell (never after a clean PASS)."""
        if record is None:
            return None if plan.applied is Route.PASS else flag_chunk(first, plan.record)
        if plan.applied is Route.PASS and not record["output_flagged"]:
            return None
        return flag_chunk(first, record)


class Watch:
    """Output moderation of one chain's stream: the core :class:`~mlpm_guard.guardrail.streaming.OutputWatch`
    (checks every ``check_every`` tokens; a chunk is handed on only after a check that also read the
    ``hold_back`` tokens after it found the answer confidently safe, as in ``Guard.stream``), judging
    with the runnable's moderator. When the whole answer is flagged the consumer gets the refusal in
    place of the held chunks (under ``on_flag="replace"``).
    """

    def __init__(self, owner: Planner, guard: Guard, conversation: list[dict[str, str]],
                 policy: Policy) -> None:
        self.owner, self.guard, self.conversation, self.policy = owner, guard, conversation, policy
        moderation = policy.output_moderation
        self.watch: OutputWatch[Any] = OutputWatch(moderation.check_every, moderation.hold_back, moderation.stop_at)
        self.ready: list[Any] = []  # chunks a passing check let out, not yet handed on

    def add(self, chunk: Any) -> bool:
        """Take a chunk (checking the text so far when a check is due); True when a check was all
        but certain that the answer is unsafe (stop the stream)."""
        text = output_text(chunk, self.owner.output_key)
        tokens = len(self.guard.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        if self.watch.add(chunk, text, tokens):
            self.ready += self.watch.checked(self.judge())
        return self.watch.stopped

    def release(self, *, everything: bool = False) -> list[Any]:
        """The held chunks that passing checks let out (all of them once the whole text passed)."""
        out, self.ready = self.ready, []
        return out + self.watch.rest() if everything else out

    def finish(self) -> Verdict:
        """The verdict on the whole streamed text (judged again only if text came since)."""
        if self.watch.due_at_end:
            self.watch.checked(self.judge())
        return self.watch.verdict

    def judge(self) -> Verdict:
        return self.owner.judge(self.guard, self.conversation, self.watch.text, self.policy)
