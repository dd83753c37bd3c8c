"""The guard: score a prompt from the backbone's own prefill, route it, answer, moderate the answer.

``PASS`` continues from the scoring prefill's KV cache, so guarding adds only the prototype
maths (a few matrix-vector products) to plain generation. Every stage can be swapped: the
backbone, the prototypes, the policy, the output moderator, and the generator of any route.
Errors fail closed (a refusal with the error recorded) unless the policy says ``fail_open``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from .backbone import Backbone, BackboneConfig, Encoded
from .errors import ConfigError, InputTypeError
from .generation import GenerationConfig, Prefill, decode, prefill
from .messages import PromptInput, check_prompt, check_prompts, check_texts, to_messages
from .moderation import PrototypeModerator
from .policy import Policy
from .prototypes import Prototypes
from .scoring import judge, views_of
from .steering import steering_vectors
from .types import GuardChunk, GuardResult, Route, Timings, Verdict
from .verdicts import failed_verdict, to_verdict, under_policy
from .views import View

logger = logging.getLogger(__name__)

#: A generator for a route: gets the caller's messages and returns the answer, whole or in pieces.
RouteHandler = Callable[..., "str | Iterable[str]"]


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class _Detokenizer:
    """Turns a growing list of token ids into text pieces without splitting a multi-byte character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.text = text[len(self.text):], text
        return piece


class _HoldBack:
    """Streamed pieces waiting for output moderation: a piece leaves only after a passing check
    that also saw ``tokens`` more tokens after it (its context, which can reveal it as harmful)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.pending: collections.deque[tuple[str, int]] = collections.deque()
        self.n_pending = 0

    def add(self, piece: str, tokens: int) -> None:
        self.pending.append((piece, tokens))
        self.n_pending += tokens

    def release(self, *, everything: bool = False) -> list[str]:
        """The pieces a passing check covering everything added so far lets out."""
        out = []
        while self.pending and (everything or self.n_pending - self.pending[0][1] >= self.tokens):
            piece, tokens = self.pending.popleft()
            self.n_pending -= tokens
            if piece:
                out.append(piece)
        return ["".join(out)] if out else []


class Guard:
    """Score, route, answer and moderate requests on one hosted backbone.

    Args:
        backbone: a :class:`Backbone`, a :class:`BackboneConfig`, or a model spec string
            (``None``: the embedded SmolLM2-135M-Instruct).
        prototypes: fitted :class:`Prototypes`, or a folder saved by them (``None``: the default
            prototypes fitted on the built-in seed set, cached after first use).
        policy: a :class:`Policy`, a dict of its fields, or a YAML/JSON file (``None``: defaults).
        generation: default decoding settings (each call may override them as keywords).
        moderator: output moderator used when the policy enables output moderation (``None``:
            the prototypes score the answer as content). Any callable
            ``(messages, response) -> Verdict | bool | float`` works.
        handlers: route to a generator that serves that route instead of the backbone, called as
            ``handler(messages, route=..., verdict=..., config=...)`` and returning a string or an
            iterable of text pieces (for example a safer model for flagged prompts only).
        steering_vectors: layer id to vector, replacing the prototypes' directions for ``STEER``.

    Example:
        >>> guard = Guard()                                    # doctest: +SKIP
        >>> guard.invoke("How do I kill a Python process?").route   # doctest: +SKIP
        <Route.PASS: 'pass'>
    """

    def __init__(self, backbone: Backbone | BackboneConfig | str | None = None,
                 prototypes: Prototypes | str | Path | None = None, policy: Policy | Mapping[str, Any] | str | Path | None = None,
                 *, generation: GenerationConfig | None = None, moderator: Callable[..., Any] | None = None,
                 handlers: Mapping[Route | str, RouteHandler] | None = None,
                 steering_vectors: Mapping[int, Sequence[float]] | None = None) -> None:
        self.backbone = backbone if isinstance(backbone, Backbone) else Backbone(backbone)
        if prototypes is None:
            from .training import default_prototypes

            prototypes = default_prototypes(self.backbone)
        elif isinstance(prototypes, (str, Path)):
            prototypes = Prototypes.load(prototypes, backbone=self.backbone)
        elif prototypes.backbone is not self.backbone:
            prototypes.bind(self.backbone)
        self.prototypes = prototypes
        self.policy = as_policy(policy)
        self.generation = generation or GenerationConfig()
        self.moderator = moderator if moderator is not None else PrototypeModerator(prototypes)
        try:
            self.handlers = {Route(k): v for k, v in (handlers or {}).items()}
        except ValueError as exc:
            raise ConfigError(f"`handlers` keys must be routes {[r.value for r in Route]}: {exc}") from None
        self.user_steering_vectors = dict(steering_vectors) if steering_vectors else None
        self._steering_lock = threading.Lock()
        self._steering_cache: dict[Any, dict[int, torch.Tensor]] = {}

    # ------------------------------------------------------------------ configuration per call
    def _policy(self, policy: Policy | Mapping[str, Any] | None) -> Policy:
        return self.policy if policy is None else as_policy(policy)

    def _config(self, overrides: Mapping[str, Any]) -> GenerationConfig:
        if not overrides:
            return self.generation
        try:
            return GenerationConfig(**{**self.generation.model_dump(), **overrides})
        except ValidationError as exc:
            raise ConfigError(f"invalid generation settings {dict(overrides)}:\n{exc}") from None

    def steering(self, policy: Policy | None = None) -> dict[int, torch.Tensor]:
        """The per-layer vectors the ``STEER`` route adds (computed once per steering config)."""
        config = (policy or self.policy).steering
        with self._steering_lock:
            if config not in self._steering_cache:
                self._steering_cache[config] = steering_vectors(
                    config, num_layers=self.backbone.num_layers, prototypes=self.prototypes,
                    vectors=self.user_steering_vectors, device=self.backbone.device, dtype=self.backbone.dtype)
            return self._steering_cache[config]

    # ------------------------------------------------------------------ scoring only
    def check(self, prompt: PromptInput, *, policy: Policy | Mapping[str, Any] | None = None) -> Verdict:
        """Score a prompt without generating (to guard an external LLM).

        The forward pass stops at the deepest layer the prototypes use. A prompt that cannot be
        scored gets an unsafe verdict carrying the error (a safe one if the policy fails open);
        a prompt of the wrong type raises :class:`~mlpm_guard.InputTypeError`.
        """
        check_prompt(prompt)
        return self.check_batch([prompt], policy=policy)[0]

    def check_batch(self, prompts: Sequence[PromptInput], *,
                    policy: Policy | Mapping[str, Any] | None = None) -> list[Verdict]:
        """:meth:`check` for many prompts: every view of every prompt in length-sorted batches."""
        check_prompts(prompts)
        return self._check_many(prompts, policy, content=False)

    def check_content(self, text: str, *, policy: Policy | Mapping[str, Any] | None = None) -> Verdict:
        """Judge a text as *content* (a retrieved passage, a tool result, a model answer).

        Content is not the user's request: it is judged inside a request for it
        (:data:`~mlpm_guard.views.CONTENT_TEMPLATE`), as a whole and in windows of a few
        sentences, so an ordinary passage passes and a harmful paragraph inside a long one does not.
        """
        if not isinstance(text, str):
            raise InputTypeError(f"content to check must be a str, got {type(text).__name__}")
        return self.check_content_batch([text], policy=policy)[0]

    def check_content_batch(self, texts: Sequence[str], *,
                            policy: Policy | Mapping[str, Any] | None = None) -> list[Verdict]:
        """:meth:`check_content` for many texts in shared batches."""
        check_texts(texts)
        return self._check_many(texts, policy, content=True)

    def _check_many(self, items: Sequence[Any], policy: Policy | Mapping[str, Any] | None, *,
                    content: bool) -> list[Verdict]:
        policy = self._policy(policy)
        out: list[Verdict | None] = [None] * len(items)
        valid: list[int] = []
        for i, item in enumerate(items):
            try:
                if not content:
                    to_messages(item)
                valid.append(i)
            except Exception as exc:  # noqa: BLE001 - fail closed on any bad input
                out[i] = failed_verdict(f"{type(exc).__name__}: {exc}", fail_open=policy.fail_open)
        if valid:
            try:
                verdicts = judge(self.backbone, self.prototypes, [items[i] for i in valid], content=content)
                for i, v in zip(valid, verdicts):
                    out[i] = under_policy(v, policy)
            except Exception as exc:  # noqa: BLE001
                logger.exception("scoring failed")
                for i in valid:
                    out[i] = failed_verdict(f"{type(exc).__name__}: {exc}", fail_open=policy.fail_open)
        return out  # type: ignore[return-value]

    def views(self, prompt: PromptInput, *, content: bool = False) -> list[View]:
        """The readings of a request (or of a text, with ``content``) that :meth:`check` scores."""
        return views_of(self.backbone, prompt, content=content)

    # ------------------------------------------------------------------ one request
    def invoke(self, prompt: PromptInput, *, policy: Policy | Mapping[str, Any] | None = None,
               **generation: Any) -> GuardResult:
        """Guard and answer one prompt (a string or a message list)."""
        check_prompt(prompt)
        result = None
        for chunk in self._run(prompt, self._policy(policy), self._config(generation), streaming=False):
            result = chunk.result or result
        assert result is not None
        return result

    def stream(self, prompt: PromptInput, *, policy: Policy | Mapping[str, Any] | None = None,
               **generation: Any) -> Iterator[GuardChunk]:
        """Guard one prompt and stream the answer token by token.

        The last chunk carries the :class:`GuardResult`. With output moderation on, the partial
        answer is checked every ``check_every`` tokens and the stream stops at the first flag.
        Text reaches the consumer only after a passing check that also read the ``hold_back``
        tokens after it, so a continuation flagged within that window is never sent: with
        ``on_flag="replace"`` the consumer receives the refusal as the next chunk instead (and
        ``result.replaced`` is set); with ``on_flag="flag"`` it receives the held text, flagged.
        """
        check_prompt(prompt)  # at the call, not at the first `next`: hence no `yield` in this method
        return self._run(prompt, self._policy(policy), self._config(generation), streaming=True)

    def _run(self, prompt: PromptInput, policy: Policy, config: GenerationConfig, *,
             streaming: bool) -> Iterator[GuardChunk]:
        start = time.perf_counter()
        messages = None
        try:
            messages = to_messages(prompt)
            rows = self.backbone.encode([messages])
            verdict, state = self._score(messages, rows, policy)
        except Exception as exc:  # noqa: BLE001 - fail closed
            yield from self._failed_chunks(self._failure(exc, policy, messages, config), streaming)
            return
        scoring_ms = _ms(start)
        route = policy.route(verdict)
        gen_start = time.perf_counter()
        parts: list[str] = []
        n_tokens = 0
        moderation_ms = 0.0
        flagged_verdict: Verdict | None = None
        moderation = policy.output_moderation
        next_check = moderation.check_every
        held = _HoldBack(moderation.hold_back) if streaming and moderation.enabled and route is not Route.REFUSE \
            else None
        try:
            pieces = self._answer(route, messages, rows, state, verdict, policy, config)
            try:
                for piece, tokens in pieces:
                    n_tokens += tokens
                    if piece:
                        parts.append(piece)
                    if held is None:
                        if streaming and piece:
                            yield GuardChunk(piece)
                        continue
                    held.add(piece, tokens)
                    if n_tokens >= next_check:
                        next_check = n_tokens + moderation.check_every
                        t = time.perf_counter()
                        v = self._moderate(messages, "".join(parts), policy)
                        moderation_ms += _ms(t)
                        if v.unsafe:
                            flagged_verdict = v
                            break
                        for released in held.release():
                            yield GuardChunk(released)
            finally:
                pieces.close()
        except Exception as exc:  # noqa: BLE001 - fail closed
            yield from self._failed_chunks(self._failure(exc, policy, messages, config, verdict=verdict), streaming)
            return
        generation_ms = _ms(gen_start) - moderation_ms
        text = "".join(parts)
        output_verdict = flagged_verdict
        if moderation.enabled and route is not Route.REFUSE and output_verdict is None:
            t = time.perf_counter()
            try:
                output_verdict = self._moderate(messages, text, policy)
            except Exception as exc:  # noqa: BLE001 - an unjudged answer fails closed too
                yield from self._failed_chunks(self._failure(exc, policy, messages, config, verdict=verdict),
                                               streaming)
                return
            moderation_ms += _ms(t)
        flagged = output_verdict is not None and output_verdict.unsafe
        replaced = flagged and moderation.on_flag == "replace"
        if held is not None:
            # What was held back goes out only now: the refusal in its place, or the checked rest.
            for piece in [policy.refusal_message] if replaced else held.release(everything=True):
                yield GuardChunk(piece)
        timings = Timings(scoring_ms, generation_ms, moderation_ms, len(rows[0]), n_tokens)
        yield GuardChunk("", GuardResult(policy.refusal_message if replaced else text, route, verdict, output_verdict,
                                         flagged, replaced, timings))

    @staticmethod
    def _failed_chunks(result: GuardResult, streaming: bool) -> Iterator[GuardChunk]:
        """The end of a request that failed: in a stream the refusal (or the unguarded answer) is
        sent as text too, since a consumer that joins the chunks' text never reads ``result``."""
        if streaming and result.text:
            yield GuardChunk(result.text)
        yield GuardChunk("", result)

    def _score(self, messages: list[dict[str, str]], rows: list[Encoded],
               policy: Policy) -> tuple[Verdict, Prefill | None]:
        """Score every view; the whole request's prefill is kept when ``PASS`` can continue from it."""
        if Route.PASS in self.handlers:
            return under_policy(judge(self.backbone, self.prototypes, [messages])[0], policy), None
        layers = self.prototypes.layer_ids_
        state = prefill(self.backbone, rows, capture=layers)
        verdict = judge(self.backbone, self.prototypes, [messages], prefilled=verdict_states(state, layers),
                        prefilled_rows=rows)[0]
        return under_policy(verdict, policy), state

    def _answer(self, route: Route, messages: list[dict[str, str]], rows: list[Encoded], state: Prefill | None,
                verdict: Verdict, policy: Policy, config: GenerationConfig) -> Iterator[tuple[str, int]]:
        """The answer of a route as (text piece, tokens) pairs."""
        handler = self.handlers.get(route)
        if handler is not None:
            out = handler(messages, route=route, verdict=verdict, config=config)
            if isinstance(out, str):
                yield out, len(self.backbone.tokenizer(out, add_special_tokens=False)["input_ids"])
            else:
                for piece in out:
                    yield str(piece), 1
            return
        if route is Route.REFUSE:
            yield policy.refusal_message, 0
            return
        steer = None
        if route is Route.PASS:
            state = state or prefill(self.backbone, rows)
        elif route is Route.SAFETY_PROMPT:
            state = prefill(self.backbone, self.backbone.encode([messages], system=policy.safety_prompt))
        else:  # STEER: the vectors act on every token, the prompt's included
            steer = self.steering(policy)
            state = prefill(self.backbone, rows, steer=steer)
        yield from self._decode_text(state, config, steer)

    def _decode_text(self, state: Prefill, config: GenerationConfig,
                     steer: dict[int, torch.Tensor] | None) -> Iterator[tuple[str, int]]:
        detok = _Detokenizer(self.backbone.tokenizer)
        eos = self.backbone.eos_token_ids
        for token in decode(self.backbone, state, config, steer=steer):
            t = int(token[0])
            if t in eos:
                break
            yield detok.push(t), 1
        tail = detok.flush()
        if tail:
            yield tail, 0

    def _moderate(self, messages: list[dict[str, str]], text: str, policy: Policy) -> Verdict:
        return to_verdict(self.moderator(messages, text), policy.output_moderation.threshold)

    def _failure(self, exc: BaseException, policy: Policy, messages: list[dict[str, str]] | None,
                 config: GenerationConfig, verdict: Verdict | None = None) -> GuardResult:
        """Fail closed (refuse, error recorded), or answer unguarded when the policy fails open."""
        error = f"{type(exc).__name__}: {exc}"
        logger.warning("guard failed %s: %s", "open" if policy.fail_open else "closed", error)
        if policy.fail_open and messages is not None:
            try:
                state = prefill(self.backbone, self.backbone.encode([messages]))
                text = "".join(piece for piece, _ in self._decode_text(state, config, None))
                return GuardResult(text, Route.PASS, verdict, error=error)
            except Exception as exc2:  # noqa: BLE001
                error = f"{error}; answering unguarded failed too: {type(exc2).__name__}: {exc2}"
        return GuardResult(policy.refusal_message, Route.REFUSE, verdict, error=error)

    # ------------------------------------------------------------------ many requests
    def batch(self, prompts: Sequence[PromptInput], *, policy: Policy | Mapping[str, Any] | None = None,
              **generation: Any) -> list[GuardResult]:
        """Guard and answer many prompts: one batched prefill scores them all, then each route's
        group is decoded as a batch (``PASS`` rows continue from the scoring prefill)."""
        check_prompts(prompts)
        policy, config = self._policy(policy), self._config(generation)
        results: list[GuardResult | None] = [None] * len(prompts)
        size = self.backbone.config.batch_size
        # Chunks of similar length: one long prompt would otherwise pad every row of its chunk,
        # and each decoding step attends over that padding (several times slower on mixed data).
        order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
        for start in range(0, len(order), size):
            index = order[start:start + size]
            try:
                self._batch_chunk(prompts, index, policy, config, results)
            except Exception:  # noqa: BLE001 - isolate the failing request(s)
                logger.exception("batched guard failed; retrying the chunk one request at a time")
                for i in index:
                    results[i] = self._one(prompts[i], policy, config)
        return results  # type: ignore[return-value]

    def _one(self, prompt: PromptInput, policy: Policy, config: GenerationConfig) -> GuardResult:
        result = None
        for chunk in self._run(prompt, policy, config, streaming=False):
            result = chunk.result or result
        assert result is not None
        return result

    def _batch_chunk(self, prompts: Sequence[PromptInput], index: list[int], policy: Policy,
                     config: GenerationConfig, results: list[GuardResult | None]) -> None:
        valid, messages = [], []
        for i in index:
            try:
                messages.append(to_messages(prompts[i]))
                valid.append(i)
            except Exception as exc:  # noqa: BLE001
                results[i] = self._failure(exc, policy, None, config)
        if not valid:
            return
        start = time.perf_counter()
        rows = self.backbone.encode(messages)
        layers = self.prototypes.layer_ids_
        state = prefill(self.backbone, rows, capture=layers)
        verdicts = [under_policy(v, policy) for v in
                    judge(self.backbone, self.prototypes, messages, prefilled=verdict_states(state, layers),
                          prefilled_rows=rows)]
        scoring_ms = _ms(start) / len(valid)
        routes = [policy.route(v) for v in verdicts]
        texts: dict[int, tuple[str, int, float]] = {}
        for route in Route:
            group = [j for j, r in enumerate(routes) if r is route]
            if not group:
                continue
            t = time.perf_counter()
            if route in self.handlers or route is Route.REFUSE:
                for j in group:
                    pieces = list(self._answer(route, messages[j], [rows[j]], None, verdicts[j], policy, config))
                    texts[j] = ("".join(p for p, _ in pieces), sum(n for _, n in pieces), _ms(t))
                continue
            steer = None
            if route is Route.PASS:
                sub = state if len(group) == len(valid) else state.select(group)
            elif route is Route.SAFETY_PROMPT:
                sub = prefill(self.backbone, self.backbone.encode([messages[j] for j in group],
                                                                  system=policy.safety_prompt))
            else:
                steer = self.steering(policy)
                sub = prefill(self.backbone, [rows[j] for j in group], steer=steer)
            decoded = self._decode_batch(sub, config, steer)
            per_item = _ms(t) / len(group)
            for j, (text, n) in zip(group, decoded):
                texts[j] = (text, n, per_item)
        moderation = policy.output_moderation
        out_verdicts: dict[int, Verdict] = {}
        moderation_ms = 0.0
        judged = [j for j, r in enumerate(routes) if r is not Route.REFUSE]
        if moderation.enabled and judged:
            t = time.perf_counter()
            if isinstance(self.moderator, PrototypeModerator):
                vs = self.moderator.batch([texts[j][0] for j in judged])
            else:
                vs = [self.moderator(messages[j], texts[j][0]) for j in judged]
            out_verdicts = {j: to_verdict(v, moderation.threshold) for j, v in zip(judged, vs)}
            moderation_ms = _ms(t) / len(judged)
        for j, i in enumerate(valid):
            text, n, gen_ms = texts[j]
            ov = out_verdicts.get(j)
            flagged = ov is not None and ov.unsafe
            replaced = flagged and moderation.on_flag == "replace"
            timings = Timings(scoring_ms, gen_ms, moderation_ms if ov else 0.0, len(rows[j]), n)
            results[i] = GuardResult(policy.refusal_message if replaced else text, routes[j], verdicts[j], ov,
                                     flagged, replaced, timings)

    def _decode_batch(self, state: Prefill, config: GenerationConfig,
                      steer: dict[int, torch.Tensor] | None) -> list[tuple[str, int]]:
        eos = self.backbone.eos_token_ids
        tokens: list[list[int]] = [[] for _ in range(len(state.logits))]
        ended = [False] * len(tokens)
        for step in decode(self.backbone, state, config, steer=steer):
            for row, t in enumerate(step.tolist()):
                if ended[row]:
                    continue
                if t in eos:
                    ended[row] = True
                else:
                    tokens[row].append(t)
        texts = self.backbone.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [(text, len(toks)) for text, toks in zip(texts, tokens)]

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

    async def astream(self, prompt: PromptInput, **kwargs: Any) -> AsyncIterator[GuardChunk]:
        """:meth:`stream` produced on a worker thread and handed to the event loop chunk by chunk.

        Leaving the loop early (``break`` or cancellation) stops generation at the next token.
        """
        check_prompt(prompt)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        end = object()

        def produce() -> None:
            gen = self.stream(prompt, **kwargs)
            try:
                for chunk in gen:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                gen.close()
                loop.call_soon_threadsafe(queue.put_nowait, end)

        worker = loop.run_in_executor(None, contextvars.copy_context().run, produce)
        try:
            while True:
                item = await queue.get()
                if item is end:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            if worker.done():
                worker.result()

    def __repr__(self) -> str:
        return f"Guard(backbone={self.backbone!r}, prototypes={self.prototypes!r})"


def as_policy(policy: Policy | Mapping[str, Any] | str | Path | None) -> Policy:
    """A :class:`Policy` from a policy, a dict of its fields, or a YAML/JSON file path."""
    if policy is None:
        return Policy()
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (str, Path)):
        return Policy.from_file(policy)
    if isinstance(policy, Mapping):
        return Policy.from_dict(dict(policy))
    raise ConfigError(f"`policy` must be a Policy, a dict or a file path, got {type(policy).__name__}")


def verdict_states(state: Prefill, layers: Sequence[int]) -> np.ndarray:
    """Captured last-token states of a prefill as an array (n, len(layers), d)."""
    return torch.stack([state.states[layer] for layer in layers], dim=1).float().cpu().numpy()

