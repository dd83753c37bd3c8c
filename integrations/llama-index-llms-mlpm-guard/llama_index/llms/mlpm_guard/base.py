"""``MLPMGuardLLM``: a LlamaIndex LLM that serves the guarded backbone.

Every call goes through :class:`mlpm_guard.Guard`: the prompt is scored from the prefill that
starts the answer, routed (pass, safety prompt, steering, refusal), answered and optionally
moderated. The guard's report rides on the response (``additional_kwargs["mlpm_guard"]`` and
``raw``) and is dispatched as a :class:`GuardDecisionEvent`.

Inside a :class:`GuardedQueryEngine` or :class:`GuardedChatEngine` the LLM takes the route the
engine chose on the bare query instead of routing the templated prompt (retrieved context and
instructions included) itself.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from typing import Any, Dict

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, field_validator
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from mlpm_guard import GenerationConfig, GuardChunk, GuardResult, Policy, Route

from llama_index.postprocessor.mlpm_guard.common import METADATA_KEY, GuardedComponent
from llama_index.postprocessor.mlpm_guard.events import GuardDecisionEvent, traced

from ._routing import RouteDirective, as_program, claim_directive, in_program, result_report

dispatcher = get_dispatcher(__name__)

# LlamaIndex roles the core's message normaliser does not know under these names.
_ROLES = {MessageRole.CHATBOT.value: "assistant", MessageRole.MODEL.value: "assistant",
          MessageRole.DEVELOPER.value: "system", MessageRole.FUNCTION.value: "tool"}


def to_core_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex chat messages as the core's ``{"role", "content"}`` dicts (text blocks only:
    the backbone reads text)."""
    role = lambda m: _ROLES.get(str(m.role.value), str(m.role.value))  # noqa: E731
    return [{"role": role(m), "content": m.content or ""} for m in messages]


class MLPMGuardLLM(GuardedComponent, CustomLLM):
    """A LlamaIndex LLM answering with the guarded backbone.

    Args:
        guard: the :class:`mlpm_guard.Guard` to serve (``None``: the embedded default, built on
            first use and shared by every default object of this package).
        generate_kwargs: decoding settings overriding the guard's defaults
            (:class:`mlpm_guard.GenerationConfig` fields: ``max_new_tokens``, ``temperature``, ...).
            The same names are also honoured per call; other per-call keywords are ignored.

    The response's ``additional_kwargs["mlpm_guard"]`` (and ``raw``) holds the
    :class:`mlpm_guard.GuardResult` as a dict: ``route``, ``blocked``, ``verdict``,
    ``output_flagged``, ``replaced``, ``timings``, ``error``, plus ``routed_by_engine``.

    Examples:
        >>> from llama_index.core import Settings                # doctest: +SKIP
        >>> Settings.llm = MLPMGuardLLM()                         # doctest: +SKIP
        >>> Settings.llm.complete("Write a haiku").additional_kwargs["mlpm_guard"]["route"]  # doctest: +SKIP
        'pass'
    """

    generate_kwargs: Dict[str, Any] = Field(
        default_factory=dict, description="GenerationConfig fields overriding the guard's decoding defaults.")

    @field_validator("generate_kwargs")
    @classmethod
    def _known_generation_fields(cls, value: Dict[str, Any]) -> Dict[str, Any]:
        unknown = sorted(set(value) - set(GenerationConfig.model_fields))
        if unknown:
            msg = (f"`generate_kwargs` has unknown keys {unknown}; allowed are the GenerationConfig fields "
                   f"{sorted(GenerationConfig.model_fields)}")
            raise ValueError(msg)
        return value

    @classmethod
    def class_name(cls) -> str:
        return "MLPMGuardLLM"

    @property
    def metadata(self) -> LLMMetadata:
        guard = self.guard
        backbone = guard.backbone
        num_output = int(self.generate_kwargs.get("max_new_tokens", guard.generation.max_new_tokens))
        # The backbone cuts prompts longer than max_prompt_tokens from the middle, so LlamaIndex
        # must pack no more context than that: the window it sees is prompt budget + answer.
        window = min(backbone.context_window, backbone.config.max_prompt_tokens + num_output)
        return LLMMetadata(context_window=window, num_output=num_output, is_chat_model=True,
                           model_name=backbone.name)

    # ------------------------------------------------------------------ per call
    def _per_call(self, kwargs: Mapping[str, Any]) -> tuple[Policy | None, dict[str, Any], RouteDirective | None]:
        """The policy (a guarded engine's route, if any), decoding settings and the engine's directive.

        Read when the call is made, not when a stream is consumed: an engine's route lives in a
        context variable that is gone by the time a streaming response is read.
        """
        directive = claim_directive()
        generation = {**self.generate_kwargs,
                      **{k: v for k, v in kwargs.items() if k in GenerationConfig.model_fields}}
        if directive is None and in_program():
            return self.guard.policy.forced(Route.PASS), generation, None
        return (None if directive is None else directive.policy), generation, directive

    # ------------------------------------------------------------------ programs
    # The prompts of structured_predict and of predict (query transforms, condensing, ...) are
    # LlamaIndex's templates around pipeline values: judged as if they were the user's words they
    # were refused (p 0.51 for a plain extraction). The user's request is judged where it enters,
    # by GuardedQueryEngine / GuardedChatEngine; here the answer is still moderated as the policy says.
    structured_predict = as_program(CustomLLM.structured_predict)
    astructured_predict = as_program(CustomLLM.astructured_predict)
    predict = as_program(CustomLLM.predict)
    apredict = as_program(CustomLLM.apredict)

    def _completion_prompt(self, prompt: str, formatted: bool) -> str | list[dict[str, str]]:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        if self.system_prompt:
            return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
        return prompt

    def _report(self, result: GuardResult, routed: RouteDirective | None, span_id: str | None = None
                ) -> dict[str, Any]:
        dispatcher.event(traced(GuardDecisionEvent.from_result(result, routed_by_engine=routed is not None,
                                                               span_id=span_id), self.guard.backbone.name))
        report = result_report(result, routed_by_engine=routed is not None)
        if routed is not None:
            routed.record(report)
        return report

    def _completion(self, result: GuardResult, routed: RouteDirective | None) -> CompletionResponse:
        report = self._report(result, routed)
        return CompletionResponse(text=result.text, raw=report, additional_kwargs={METADATA_KEY: report})

    def _chat(self, result: GuardResult, routed: RouteDirective | None) -> ChatResponse:
        report = self._report(result, routed)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text), raw=report,
                            additional_kwargs={METADATA_KEY: report})

    def _completion_stream(self, chunks: Generator[GuardChunk, None, None], routed: RouteDirective | None,
                           span_id: str | None) -> CompletionResponseGen:
        text = ""
        try:
            for chunk in chunks:
                if chunk.text:
                    text += chunk.text
                    yield CompletionResponse(text=text, delta=chunk.text)
                if chunk.result is not None:
                    yield self._last_completion(chunk.result, text, routed, span_id)
        finally:  # a consumer that stops reading stops decoding at the next token
            chunks.close()

    def _last_completion(self, result: GuardResult, text: str, routed: RouteDirective | None, span_id: str | None
                         ) -> CompletionResponse:
        # The stream's last response carries the report. An answer that was never streamed (the
        # guard failed closed, or open, before decoding) arrives whole as its delta; one replaced
        # by output moderation has the refusal as its text (pieces already sent cannot be withdrawn).
        report = self._report(result, routed, span_id)
        delta = "" if text else result.text
        return CompletionResponse(text=result.text if result.replaced or not text else text, delta=delta,
                                  raw=report, additional_kwargs={METADATA_KEY: report})

    @staticmethod
    def _as_chat(response: CompletionResponse) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=response.text),
                            delta=response.delta, raw=response.raw, additional_kwargs=response.additional_kwargs)

    # ------------------------------------------------------------------ sync
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        policy, generation, routed = self._per_call(kwargs)
        result = self.guard.invoke(self._completion_prompt(prompt, formatted), policy=policy, **generation)
        return self._completion(result, routed)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        policy, generation, routed = self._per_call(kwargs)
        chunks = self.guard.stream(self._completion_prompt(prompt, formatted), policy=policy, **generation)
        return self._completion_stream(chunks, routed, active_span_id.get())

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        policy, generation, routed = self._per_call(kwargs)
        result = self.guard.invoke(to_core_messages(messages), policy=policy, **generation)
        return self._chat(result, routed)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        policy, generation, routed = self._per_call(kwargs)
        chunks = self.guard.stream(to_core_messages(messages), policy=policy, **generation)
        span_id = active_span_id.get()
        return (self._as_chat(r) for r in self._completion_stream(chunks, routed, span_id))

    # ------------------------------------------------------------------ async: the model runs on a worker thread
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        policy, generation, routed = self._per_call(kwargs)
        result = await self.guard.ainvoke(self._completion_prompt(prompt, formatted), policy=policy, **generation)
        return self._completion(result, routed)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        policy, generation, routed = self._per_call(kwargs)
        chunks = self.guard.astream(self._completion_prompt(prompt, formatted), policy=policy, **generation)
        return self._acompletion_stream(chunks, routed, active_span_id.get())

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        policy, generation, routed = self._per_call(kwargs)
        result = await self.guard.ainvoke(to_core_messages(messages), policy=policy, **generation)
        return self._chat(result, routed)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        policy, generation, routed = self._per_call(kwargs)
        chunks = self.guard.astream(to_core_messages(messages), policy=policy, **generation)
        completions = self._acompletion_stream(chunks, routed, active_span_id.get())

        async def gen() -> ChatResponseAsyncGen:
            async for response in completions:
                yield self._as_chat(response)

        return gen()

    async def _acompletion_stream(self, chunks: AsyncGenerator[GuardChunk, None], routed: RouteDirective | None,
                                  span_id: str | None) -> CompletionResponseAsyncGen:
        text = ""
        try:
            async for chunk in chunks:
                if chunk.text:
                    text += chunk.text
                    yield CompletionResponse(text=text, delta=chunk.text)
                if chunk.result is not None:
                    yield self._last_completion(chunk.result, text, routed, span_id)
        finally:
            await chunks.aclose()
