"""The guard: score a prompt from the backbone's own prefill, route it, answer, moderate the answer.

``PASS`` continues from the scoring prefill's KV cache, so guarding a one-sentence prompt adds
only the prototype maths (a few matrix-vector products) to plain generation; a longer request
also pays one short forward pass per extra reading (:mod:`.views`). Every stage can be swapped: the
backbone, the prototypes, the policy, the output moderator, and the generator of any route.
Errors fail closed (a refusal with the error recorded) unless the policy says ``fail_open``.

:class:`Guard` is the public face: it holds the parts and the defaults, and each call runs the
stages of :mod:`.pipeline` (score -> route -> answer -> moderate) with them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import pipeline
from .async_bridge import iterate_in_thread
from ..model.backbone import Backbone, BackboneConfig
from ..vocabulary.errors import ConfigError, InputTypeError
from ..model.generation import GenerationConfig
from ..vocabulary.messages import PromptInput, check_prompt, check_prompts, check_texts, to_messages
from .moderation import PrototypeModerator
from .pipeline import RouteHandler
from .policy import Policy
from ..estimator.prototypes import Prototypes
from ..model.safety_prompt import SafetyPrompt, as_safety_prompt
from .scoring import views_of
from ..model.steering import SteeringCache, steering_vectors
from ..vocabulary.types import GuardChunk, GuardResult, Route, Verdict
from .views import View

if TYPE_CHECKING:
    from ..estimator.scorer import Scorer
    from .decision_log import DecisionLog

__all__ = ["Guard", "RouteHandler", "as_policy", "load_scorer"]

PolicyInput = Policy | Mapping[str, Any] | None


class Guard:
    """Score, route, answer and moderate requests on one hosted backbone.

    Args:
        backbone: a :class:`Backbone`, a :class:`BackboneConfig`, or a model spec string
            (``None``: the embedded SmolLM2-135M-Instruct).
        prototypes: fitted :class:`Prototypes`, or a folder saved by them (``None``: the default
            prototypes, which ship with the package for the embedded backbone; for another
            backbone, fitted once on the built-in seed set and cached).
        policy: a :class:`Policy`, a dict of its fields, or a YAML/JSON file (``None``: defaults).
        generation: default decoding settings (each call may override them as keywords).
        moderator: output moderator used when the policy enables output moderation (``None``:
            the prototypes score the answer as content). Any callable
            ``(messages, response) -> Verdict | bool | float`` works.
        handlers: route to a generator that serves that route instead of the backbone, called as
            ``handler(messages, route=..., verdict=..., config=...)`` and returning a string or an
            iterable of text pieces (for example a safer model for flagged prompts only).
        steering_vectors: layer id to vector, replacing the prototypes' directions for ``STEER``.
        safety_prompt: a trained safety prompt for the ``SAFETY_PROMPT`` route
            (:class:`~mlpm_guard.model.safety_prompt.SafetyPrompt` or a folder written by
            ``mlpm-guard fit-safety-prompt``); ``None``: the one shipped for the backbone, if any;
            ``False``: none, the policy's written prompt only. It is used while the policy's
            ``safety_prompt`` is the text it was trained to replace, which traces keep showing.

    ``prototypes`` may also be a :class:`~mlpm_guard.estimator.siren.NeuronProbe` (or its folder): the
    SIREN-style scorer, behind the same verdicts, policy and routes.
        decision_log: where every decision of this guard is recorded (:class:`~mlpm_guard.DecisionLog`);
            checks of requests and content and answered requests are logged, answers checked on
            their own are not (a streamed answer is checked many times).

    Example:
        >>> guard = Guard()                                    # doctest: +SKIP
        >>> guard.invoke("How do I kill a Python process?").route   # doctest: +SKIP
        <Route.PASS: 'pass'>
    """

    def __init__(self, backbone: Backbone | BackboneConfig | str | None = None,
                 prototypes: Prototypes | str | Path | None = None, policy: PolicyInput | str | Path = None,
                 *, generation: GenerationConfig | None = None, moderator: Callable[..., Any] | None = None,
                 handlers: Mapping[Route | str, RouteHandler] | None = None,
                 steering_vectors: Mapping[int, Sequence[float]] | None = None,
                 safety_prompt: SafetyPrompt | str | Path | bool | None = None,
                 decision_log: DecisionLog | None = None) -> None:
        self.backbone = backbone if isinstance(backbone, Backbone) else Backbone(backbone)
        if prototypes is None:
            from ..estimator.shipped import default_prototypes

            prototypes = default_prototypes(self.backbone)
        elif isinstance(prototypes, (str, Path)):
            prototypes = load_scorer(prototypes, self.backbone)
        elif prototypes.backbone is not self.backbone:
            prototypes.bind(self.backbone)
        self.prototypes = prototypes
        self.policy = as_policy(policy)
        self.generation = generation or GenerationConfig()
        self.moderator = moderator if moderator is not None else PrototypeModerator(lambda: self.prototypes)
        try:
            self.handlers = {Route(k): v for k, v in (handlers or {}).items()}
        except ValueError as exc:
            raise ConfigError(f"`handlers` keys must be routes {[r.value for r in Route]}: {exc}") from None
        self.user_steering_vectors = dict(steering_vectors) if steering_vectors else None
        self._steering = SteeringCache()
        self.safety_prompt = as_safety_prompt(safety_prompt, self.backbone)
        self.decision_log = decision_log

    def _stages(self, moderator: Callable[..., Any] | None = None) -> pipeline.Stages:
        # Built per call from the current parts, so a part swapped on the guard takes effect at once.
        return pipeline.Stages(self.backbone, self.prototypes, moderator or self.moderator, self.handlers,
                               self.steering, self.safety_prompt)

    def _policy(self, policy: PolicyInput) -> Policy:
        return self.policy if policy is None else as_policy(policy)

    def use_prototypes(self, prototypes: Scorer) -> None:
        """Judge with ``prototypes`` from now on (a hot reload); the steering directions, which
        come from the prototypes, are computed again on their next use."""
        self.prototypes = prototypes
        self._steering = SteeringCache()

    def steering(self, policy: Policy | None = None) -> dict[int, torch.Tensor]:
        """The per-layer vectors the ``STEER`` route adds (computed once per steering config)."""
        return self._steering.get((policy or self.policy).steering, lambda config: steering_vectors(
            config, num_layers=self.backbone.num_layers, prototypes=self.prototypes,
            vectors=self.user_steering_vectors, device=self.backbone.device, dtype=self.backbone.dtype))

    # ------------------------------------------------------------------ scoring only
    def check(self, prompt: PromptInput, *, policy: PolicyInput = None) -> Verdict:
        """Score a prompt without generating (to guard an external LLM).

        The forward pass stops at the deepest layer the prototypes use. A prompt that cannot be
        scored gets an unsafe verdict carrying the error (a safe one if the policy fails open);
        a prompt of the wrong type raises :class:`~mlpm_guard.InputTypeError`.
        """
        check_prompt(prompt)
        return self.check_batch([prompt], policy=policy)[0]

    def check_batch(self, prompts: Sequence[PromptInput], *, policy: PolicyInput = None) -> list[Verdict]:
        """:meth:`check` for many prompts: every view of every prompt in length-sorted batches."""
        check_prompts(prompts)
        return self._check_many(prompts, policy, "request")

    def check_content(self, text: str, *, policy: PolicyInput = None) -> Verdict:
        """Judge a text as *content* (a retrieved passage, a tool result, a model answer).

        Content is not the user's request: it is judged inside a request for it
        (:data:`~mlpm_guard.guardrail.views.CONTENT_TEMPLATE`), as a whole and in windows of a few
        sentences, so an ordinary passage passes and a harmful paragraph inside a long one does not.
        """
        if not isinstance(text, str):
            raise InputTypeError(f"content to check must be a str, got {type(text).__name__}")
        return self.check_content_batch([text], policy=policy)[0]

    def check_content_batch(self, texts: Sequence[str], *, policy: PolicyInput = None) -> list[Verdict]:
        """:meth:`check_content` for many texts in shared batches."""
        check_texts(texts)
        return self._check_many(texts, policy, "content")

    def _check_many(self, items: Sequence[Any], policy: PolicyInput, kind: str) -> list[Verdict]:
        policy = self._policy(policy)
        verdicts = pipeline.check_many(self._stages(), items, policy, kind=kind)
        self._log_verdicts(items, verdicts, policy, kind)
        return verdicts

    def check_answer(self, messages: PromptInput | None, answer: str, *, policy: PolicyInput = None,
                     moderator: Callable[..., Any] | None = None) -> Verdict:
        """Judge an answer as output moderation does, wherever it streams from: in the conversation
        it answers (``messages``, ``None`` when unknown), by the guard's moderator (or ``moderator``),
        at the policy's line for answers (``output_moderation.threshold``)."""
        if not isinstance(answer, str):
            raise InputTypeError(f"an answer to check must be a str, got {type(answer).__name__}")
        conversation = to_messages(messages) if messages else None
        return pipeline.answer_verdicts(self._stages(moderator), [(conversation, answer)], self._policy(policy))[0]

    async def acheck_answer(self, messages: PromptInput | None, answer: str, **kwargs: Any) -> Verdict:
        return await asyncio.to_thread(self.check_answer, messages, answer, **kwargs)

    def views(self, prompt: PromptInput, *, content: bool = False) -> list[View]:
        """The readings of a request (or of a text, with ``content``) that :meth:`check` scores."""
        return views_of(self.backbone, prompt, kind="content" if content else "request")

    # ------------------------------------------------------------------ answering
    def invoke(self, prompt: PromptInput, *, policy: PolicyInput = None, **generation: Any) -> GuardResult:
        """Guard and answer one prompt (a string or a message list).

        Keywords are :class:`GenerationConfig` fields for this call (``max_new_tokens``,
        ``temperature``, ``stop``, ...).
        """
        check_prompt(prompt)
        policy = self._policy(policy)
        result = pipeline.result_of(pipeline.run_one(self._stages(), prompt, policy,
                                                     self.generation.updated(generation), streaming=False))
        self._log_results([prompt], [result], policy)
        return result

    def stream(self, prompt: PromptInput, *, policy: PolicyInput = None, **generation: Any) -> Iterator[GuardChunk]:
        """Guard one prompt and stream the answer token by token.

        The last chunk carries the :class:`GuardResult`. With output moderation on, the partial
        answer is checked every ``check_every`` tokens and the stream stops at the first flag.
        Text reaches the consumer only after a passing check that also read the ``hold_back``
        tokens after it, so a continuation flagged within that window is never sent: with
        ``on_flag="replace"`` the consumer receives the refusal as the next chunk instead (and
        ``result.replaced`` is set); with ``on_flag="flag"`` it receives the held text, flagged.
        """
        check_prompt(prompt)  # at the call, not at the first `next`: hence no `yield` in this method
        policy = self._policy(policy)
        chunks = pipeline.run_one(self._stages(), prompt, policy, self.generation.updated(generation), streaming=True)
        return chunks if self.decision_log is None else self._logged_stream(prompt, chunks, policy)

    def batch(self, prompts: Sequence[PromptInput], *, policy: PolicyInput = None,
              **generation: Any) -> list[GuardResult]:
        """Guard and answer many prompts: one batched prefill scores them all, then each route's
        group is decoded as a batch (``PASS`` rows continue from the scoring prefill)."""
        check_prompts(prompts)
        policy = self._policy(policy)
        results = pipeline.run_batch(self._stages(), prompts, policy, self.generation.updated(generation))
        self._log_results(prompts, results, policy)
        return results

    # ------------------------------------------------------------------ decision log
    # Logged here, under the public methods, so every caller (the server's answer lane, the
    # LangChain and LlamaIndex adapters) is recorded once, with no code of its own.
    def _log_verdicts(self, prompts: Sequence[Any], verdicts: Sequence[Verdict], policy: Policy, kind: str) -> None:
        if self.decision_log is not None:
            from .decision_log import verdict_decision

            self.decision_log.record_many([verdict_decision(v, policy) for v in verdicts], prompts, kind=kind,
                                          policy=policy, prototypes_version=prototypes_version(self.prototypes))

    def _log_results(self, prompts: Sequence[Any], results: Sequence[GuardResult], policy: Policy) -> None:
        if self.decision_log is not None:
            self.decision_log.record_many([r.decision() for r in results], prompts, policy=policy,
                                          prototypes_version=prototypes_version(self.prototypes))

    def _logged_stream(self, prompt: PromptInput, chunks: Iterator[GuardChunk], policy: Policy) -> Iterator[GuardChunk]:
        try:
            for chunk in chunks:
                if chunk.result is not None:
                    self._log_results([prompt], [chunk.result], policy)
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    # ------------------------------------------------------------------ async
    async def ainvoke(self, prompt: PromptInput, **kwargs: Any) -> GuardResult:
        """:meth:`invoke` on a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.invoke, prompt, **kwargs)

    async def abatch(self, prompts: Sequence[PromptInput], **kwargs: Any) -> list[GuardResult]:
        return await asyncio.to_thread(self.batch, prompts, **kwargs)

    async def acheck(self, prompt: PromptInput, **kwargs: Any) -> Verdict:
        return await asyncio.to_thread(self.check, prompt, **kwargs)

    async def acheck_batch(self, prompts: Sequence[PromptInput], **kwargs: Any) -> list[Verdict]:
        return await asyncio.to_thread(self.check_batch, prompts, **kwargs)

    async def acheck_content(self, text: str, **kwargs: Any) -> Verdict:
        return await asyncio.to_thread(self.check_content, text, **kwargs)

    async def acheck_content_batch(self, texts: Sequence[str], **kwargs: Any) -> list[Verdict]:
        return await asyncio.to_thread(self.check_content_batch, texts, **kwargs)

    def astream(self, prompt: PromptInput, **kwargs: Any) -> AsyncIterator[GuardChunk]:
        """:meth:`stream` produced on a worker thread and handed to the event loop chunk by chunk.

        Leaving the loop early (``break`` or cancellation) stops generation at the next token.
        """
        check_prompt(prompt)
        return iterate_in_thread(lambda: self.stream(prompt, **kwargs))

    def __repr__(self) -> str:
        return f"Guard(backbone={self.backbone!r}, prototypes={self.prototypes!r})"


def prototypes_version(prototypes: Scorer) -> str | None:
    """The version a prototype store gave these prototypes (:mod:`mlpm_guard.estimator.prototype_store`), if any."""
    return getattr(prototypes, "version_", None)


def load_scorer(path: str | Path, backbone: Backbone) -> Any:
    """The scorer saved in folder ``path``: a neuron probe (``mlpm-guard fit-siren``) or prototypes."""
    from ..estimator.siren import META_FILE as PROBE_FILE, NeuronProbe

    if (Path(path) / PROBE_FILE).is_file():
        return NeuronProbe.load(path, backbone=backbone)
    return Prototypes.load(path, backbone=backbone)


def as_policy(policy: Policy | Mapping[str, Any] | str | Path | None) -> Policy:
    """A :class:`Policy` from a policy, a dict of its fields, a preset name (``"strict"``,
    ``"balanced"``, ``"permissive"``) or a YAML/JSON file path."""
    if policy is None:
        return Policy()
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str) and not Path(policy).exists():
        from .presets import PRESETS, policy_preset

        if policy in PRESETS:
            return policy_preset(policy)
    if isinstance(policy, (str, Path)):
        return Policy.from_file(policy)
    if isinstance(policy, Mapping):
        return Policy.from_dict(dict(policy))
    raise ConfigError(f"`policy` must be a Policy, a dict or a file path, got {type(policy).__name__}")
