"""The guard's pipeline: score -> route -> answer -> moderate, over one request or a batch of them.

Each stage is a method of :class:`Stages`, which holds the parts of one guard:

- **score**: one prefill of the requests scores them all and is kept, so that ``PASS`` continues
  from it (for a one-sentence prompt guarding then adds only the prototype maths to plain
  generation; other readings of a longer request take their own short forward passes);
- **route**: the policy's route for each verdict;
- **answer**: the route's answer: a route handler, the refusal, or the backbone decoding from the
  right prefill (the scoring one, one with the safety prompt first, or a steered one);
- **moderate**: the answer's own verdict, when the policy moderates output.

Three drivers run the stages: :func:`run_one` for one request, streamed or not (``Guard.invoke``
and ``Guard.stream``, where output moderation also checks the answer on the way and holds text
back until a check has passed it), :func:`run_batch` for many (``Guard.batch``: a chunk is scored
in one batched prefill and each route's group is decoded as a batch), and :func:`check_many` for
the score stage alone (``Guard.check*``). The server and the agent middleware call Guard's public
methods, so they drive the same stages. Every result is built by :func:`assemble`, and every
failure goes through :func:`fail`: refused with the error recorded, or answered unguarded when the
policy fails open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..model.backbone import Backbone
from ..model.encoding import Encoded
from ..model.generation import GenerationConfig, Prefill, decode, prefill
from ..vocabulary.messages import PromptInput, to_messages
from ..vocabulary.types import GuardChunk, GuardResult, Route, Timings, Verdict
from ..vocabulary.verdicts import failed_verdict, to_verdict
from .external import replaces
from .moderation import PrototypeModerator
from .policy import Policy, under_policy
from .scoring import Kind, judge
from .streaming import Detokenizer, OutputWatch, StopCut, cut_at_stop

if TYPE_CHECKING:
    from ..estimator.scorer import Scorer

logger = logging.getLogger(__name__)

#: A generator for a route: gets the caller's messages and returns the answer, whole or in pieces.
RouteHandler = Callable[..., "str | Iterable[str]"]
Steer = dict[int, torch.Tensor]


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@dataclass
class Request:
    """One request as it moves through the stages; :func:`assemble` makes it a result."""

    prompt: PromptInput
    messages: list[dict[str, str]] | None = None
    row: Encoded | None = None
    verdict: Verdict | None = None
    route: Route = Route.REFUSE
    text: str = ""
    completion_tokens: int = 0
    output_verdict: Verdict | None = None
    error: str | None = None
    scoring_ms: float = 0.0
    generation_ms: float = 0.0
    moderation_ms: float = 0.0


def assemble(request: Request, policy: Policy) -> GuardResult:
    """The one place a result is built: a flagged answer is replaced by the refusal when the policy says so."""
    flagged = request.output_verdict is not None and request.output_verdict.unsafe
    replaced = replaces(request.output_verdict, policy)
    timings = Timings(request.scoring_ms, request.generation_ms, request.moderation_ms,
                      len(request.row) if request.row is not None else 0, request.completion_tokens)
    return GuardResult(policy.refusal_message if replaced else request.text, request.route, request.verdict,
                       request.output_verdict, flagged, replaced, timings, request.error)


class Stages:
    """The four stages over the parts of one guard (read per call, so a guard's parts can be swapped)."""

    def __init__(self, backbone: Backbone, prototypes: Scorer, moderator: Callable[..., Any],
                 handlers: Mapping[Route, RouteHandler], steering: Callable[[Policy], Steer],
                 safety_prompt: Any = None) -> None:
        self.backbone, self.prototypes, self.moderator = backbone, prototypes, moderator
        self.handlers, self.steering = handlers, steering
        # A trained (soft) safety prompt, :class:`~mlpm_guard.model.safety_prompt.SafetyPrompt`, or None.
        self.safety_prompt = safety_prompt

    # ------------------------------------------------------------------ score, route
    def score(self, requests: Sequence[Request], policy: Policy) -> Prefill | None:
        """Verdicts for requests whose messages are set, from one prefill that is returned when
        ``PASS`` can continue from it (a ``PASS`` handler needs none: the forward pass then stops
        at the deepest layer the prototypes use)."""
        start = time.perf_counter()
        messages = [r.messages for r in requests]
        rows = self.backbone.encode(messages)
        state = None
        if Route.PASS in self.handlers:
            verdicts = judge(self.backbone, self.prototypes, messages, rows=rows)
        else:
            layers, poolings = self.prototypes.layer_ids_, self.prototypes.poolings_
            state = prefill(self.backbone, rows, capture=layers, pool="mean" in poolings)
            verdicts = judge(self.backbone, self.prototypes, messages, rows=rows,
                             prefilled=state.layer_states(layers, poolings))
        spent = _ms(start) / len(requests)
        for request, row, verdict in zip(requests, rows, verdicts):
            request.row, request.verdict, request.scoring_ms = row, under_policy(verdict, policy), spent
        return state

    @staticmethod
    def route(requests: Sequence[Request], policy: Policy) -> None:
        for request in requests:
            request.route = policy.route(request.verdict)

    # ------------------------------------------------------------------ answer
    def pieces(self, request: Request, policy: Policy, config: GenerationConfig,
               state: Prefill | None) -> Iterator[tuple[str, int]]:
        """One request's answer as (text piece, tokens) pairs; ``state`` is its scoring prefill, if kept."""
        handler = self.handlers.get(request.route)
        if handler is not None:
            out = handler(request.messages, route=request.route, verdict=request.verdict, config=config)
            if isinstance(out, str):
                yield out, len(self.backbone.tokenizer(out, add_special_tokens=False)["input_ids"])
            else:
                yield from ((str(piece), 1) for piece in out)
        elif request.route is Route.REFUSE:
            yield policy.refusal_message, 0
        else:
            yield from self.text_pieces(*self.start(request.route, [request], policy, state), config)

    def answer_batch(self, requests: Sequence[Request], policy: Policy, config: GenerationConfig,
                     state: Prefill | None) -> None:
        """Every request's whole answer: handlers and refusals one by one, each backbone route's
        group decoded as one batch (``state``: the requests' scoring prefill, if kept)."""
        for route in Route:
            group = [j for j, r in enumerate(requests) if r.route is route]
            if not group:
                continue
            if route in self.handlers or route is Route.REFUSE:
                for j in group:
                    start = time.perf_counter()
                    pieces = list(self.pieces(requests[j], policy, config, None))
                    requests[j].text = "".join(p for p, _ in pieces)
                    requests[j].completion_tokens = sum(n for _, n in pieces)
                    requests[j].generation_ms = _ms(start)
                continue
            start = time.perf_counter()
            passing = None
            if route is Route.PASS and state is not None:
                passing = state if len(group) == len(requests) else state.select(group)
            texts = self.texts(*self.start(route, [requests[j] for j in group], policy, passing), config)
            spent = _ms(start) / len(group)
            for j, (text, n) in zip(group, texts):
                requests[j].text, requests[j].completion_tokens, requests[j].generation_ms = text, n, spent

    def start(self, route: Route, requests: Sequence[Request], policy: Policy,
              passing: Prefill | None) -> tuple[Prefill, Steer | None]:
        """Where a group of one backbone route starts decoding, and the steering it decodes with.

        ``PASS`` continues from the scoring prefill (``passing``, when it was kept);
        ``SAFETY_PROMPT`` prefills again with the safety prompt first: the trained one for the
        written text it was trained with (in its place, or before it), else the policy's written
        text; ``STEER`` prefills with the steering vectors, which act on every token, the prompt's
        included.
        """
        rows = [r.row for r in requests]
        if route is Route.PASS:
            return (passing if passing is not None else prefill(self.backbone, rows)), None
        if route is Route.SAFETY_PROMPT:
            trained = self.safety_prompt
            # A policy with a text of its own asks for that text: the trained prompt stands in
            # only for the one it was trained to replace.
            if trained is not None and trained.replaces(policy.safety_prompt):
                soft_rows, soft = trained.inputs(self.backbone, [r.messages for r in requests])
                return prefill(self.backbone, soft_rows, soft=soft), None
            safe_rows = self.backbone.encode([r.messages for r in requests], system=policy.safety_prompt)
            return prefill(self.backbone, safe_rows), None
        steer = self.steering(policy)
        return prefill(self.backbone, rows, steer=steer), steer

    def text_pieces(self, state: Prefill, steer: Steer | None, config: GenerationConfig) -> Iterator[tuple[str, int]]:
        """One row's decoding as (text piece, tokens) pairs, ending before an end token or a stop string."""
        detok, cut = Detokenizer(self.backbone.tokenizer), StopCut(config.stop)
        eos = self.backbone.eos_token_ids
        tokens = decode(self.backbone, state, config, steer=steer)
        try:
            for token in tokens:
                t = int(token[0])
                if t in eos:
                    break
                yield cut.push(detok.push(t)), 1
                if cut.done:
                    return
            tail = cut.push(detok.flush())
            tail += "" if cut.done else cut.flush()
            if tail:
                yield tail, 0
        finally:
            tokens.close()

    def texts(self, state: Prefill, steer: Steer | None, config: GenerationConfig) -> list[tuple[str, int]]:
        """Every row's whole decoding as (text, tokens), each ending before an end token or a stop string."""
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
        return [(cut_at_stop(text, config.stop), len(toks)) for text, toks in zip(texts, tokens)]

    # ------------------------------------------------------------------ moderate
    def output_verdicts(self, answers: Sequence[tuple[list[dict[str, str]] | None, str]],
                        policy: Policy) -> list[Verdict]:
        """The moderator's verdicts of (messages, answer) pairs."""
        return answer_verdicts(self, answers, policy)

    def moderate(self, requests: Sequence[Request], policy: Policy) -> None:
        """The final output verdict of each answered request not judged yet (when the policy moderates)."""
        judged = [r for r in requests if r.route is not Route.REFUSE and r.output_verdict is None]
        if not policy.output_moderation.enabled or not judged:
            return
        start = time.perf_counter()
        verdicts = self.output_verdicts([(r.messages, r.text) for r in judged], policy)
        spent = _ms(start) / len(judged)
        for request, verdict in zip(judged, verdicts):
            request.output_verdict = verdict
            request.moderation_ms += spent


def answer_verdicts(stages: Stages, answers: Sequence[tuple[list[dict[str, str]] | None, str]],
                    policy: Policy) -> list[Verdict]:
    """Output moderation's judgement of (messages, answer) pairs, the one way answers are judged
    (the guard's own, a proxied upstream's, a LangChain chain's, an agent's): the stages' moderator,
    at the policy's line for answers."""
    threshold = policy.output_moderation.threshold
    if isinstance(stages.moderator, PrototypeModerator):  # one batch for all
        verdicts = stages.moderator.batch(answers)
    else:
        verdicts = [stages.moderator(messages, text) for messages, text in answers]
    return [to_verdict(v, threshold) for v in verdicts]


# ---------------------------------------------------------------------- drivers
def run_one(stages: Stages, prompt: PromptInput, policy: Policy, config: GenerationConfig, *,
            streaming: bool) -> Iterator[GuardChunk]:
    """One request through the stages; the last chunk carries the result (the only chunk unless ``streaming``)."""
    request = Request(prompt)
    try:
        request.messages = to_messages(prompt)
        state = stages.score([request], policy)
    except Exception as exc:  # noqa: BLE001 - fail closed
        yield from _failed_chunks(fail(stages, request, exc, policy, config), streaming)
        return
    stages.route([request], policy)
    answer = _Answer(stages, request, policy, streaming)
    try:
        yield from (GuardChunk(piece) for piece in answer.stream(stages.pieces(request, policy, config, state)))
        stages.moderate([request], policy)  # the whole answer, unless a check on the way flagged it
    except Exception as exc:  # noqa: BLE001 - an unjudged answer fails closed too
        yield from _failed_chunks(fail(stages, request, exc, policy, config), streaming)
        return
    result = assemble(request, policy)
    yield from (GuardChunk(piece) for piece in answer.rest(result.replaced))
    yield GuardChunk("", result)


class _Answer:
    """One request's answer on its way to the consumer.

    Streamed with output moderation on, the answer so far is checked every ``check_every`` tokens;
    text leaves under :class:`~mlpm_guard.guardrail.streaming.OutputWatch`'s rule (only after a check that
    read it and the ``hold_back`` tokens after it found the answer confidently safe), and the whole
    answer's verdict decides at its end whether the held rest goes out or the refusal replaces it.
    """

    def __init__(self, stages: Stages, request: Request, policy: Policy, streaming: bool) -> None:
        self.stages, self.request, self.policy, self.streaming = stages, request, policy, streaming
        moderation = policy.output_moderation
        watched = streaming and moderation.enabled and request.route is not Route.REFUSE
        self.watch: OutputWatch[str] | None = OutputWatch(
            moderation.check_every, moderation.hold_back, moderation.stop_at) if watched else None

    def stream(self, pieces: Iterator[tuple[str, int]]) -> Iterator[str]:
        """The text the consumer may see while the answer is produced; the request gets the whole answer."""
        request, parts = self.request, []
        start = time.perf_counter()
        try:
            for piece, tokens in pieces:
                request.completion_tokens += tokens
                if piece:
                    parts.append(piece)
                if self.watch is None:
                    if self.streaming and piece:
                        yield piece
                    continue
                if self.watch.add(piece, piece, tokens):
                    released = self.watch.checked(self._check(self.watch.text))
                    if self.watch.stopped:
                        request.output_verdict = self.watch.verdict
                        break
                    yield from _joined(released)
        finally:
            pieces.close()
        request.text = "".join(parts)
        request.generation_ms = _ms(start) - request.moderation_ms

    def _check(self, text: str) -> Verdict:
        """Check the answer so far (what may be shown; the whole answer's verdict comes at its end)."""
        start = time.perf_counter()
        verdict = self.stages.output_verdicts([(self.request.messages, text)], self.policy)[0]
        self.request.moderation_ms += _ms(start)
        return verdict

    def rest(self, replaced: bool) -> list[str]:
        """What was held back goes out at the end: the refusal in its place, or the checked rest."""
        if self.watch is None:
            return []
        return [self.policy.refusal_message] if replaced else _joined(self.watch.rest())


def _joined(pieces: list[str]) -> list[str]:
    """Released pieces as one chunk of text (none when they hold no text)."""
    text = "".join(pieces)
    return [text] if text else []


def fail(stages: Stages, request: Request, exc: BaseException, policy: Policy,
         config: GenerationConfig) -> GuardResult:
    """Fail closed (refuse, error recorded), or answer unguarded when the policy fails open."""
    error = f"{type(exc).__name__}: {exc}"
    logger.warning("guard failed %s: %s", "open" if policy.fail_open else "closed", error)
    request.route, request.text, request.output_verdict = Route.REFUSE, policy.refusal_message, None
    request.completion_tokens = 0
    if policy.fail_open and request.messages is not None:
        try:
            state = prefill(stages.backbone, stages.backbone.encode([request.messages]))
            pieces = list(stages.text_pieces(state, None, config))
            request.route, request.text = Route.PASS, "".join(p for p, _ in pieces)
            request.completion_tokens = sum(n for _, n in pieces)
        except Exception as exc2:  # noqa: BLE001
            error = f"{error}; answering unguarded failed too: {type(exc2).__name__}: {exc2}"
    request.error = error
    return assemble(request, policy)


def failed_result(error: str, policy: Policy) -> GuardResult:
    """The result of a request that failed outside the stages (a server's lane, a broken stream):
    refused, with its error recorded (a policy that fails open answers through :func:`fail`)."""
    request = Request(None)
    request.text, request.error = policy.refusal_message, error
    return assemble(request, policy)


def _failed_chunks(result: GuardResult, streaming: bool) -> Iterator[GuardChunk]:
    """The end of a request that failed: in a stream the refusal (or the unguarded answer) is
    sent as text too, since a consumer that joins the chunks' text never reads ``result``."""
    if streaming and result.text:
        yield GuardChunk(result.text)
    yield GuardChunk("", result)


def result_of(chunks: Iterable[GuardChunk]) -> GuardResult:
    """The result a run of :func:`run_one` ends with."""
    result = None
    for chunk in chunks:
        result = chunk.result or result
    assert result is not None
    return result


def run_batch(stages: Stages, prompts: Sequence[PromptInput], policy: Policy,
              config: GenerationConfig) -> list[GuardResult]:
    """Many requests, in chunks of the backbone's batch size formed by length.

    A chunk is scored in one batched prefill, and each route's group is decoded as a batch
    (``PASS`` rows continue from the scoring prefill). A chunk that fails is run again one
    request at a time, so one bad request fails alone.
    """
    results: list[GuardResult | None] = [None] * len(prompts)
    size = stages.backbone.config.batch_size
    # Chunks of similar length: one long prompt would otherwise pad every row of its chunk,
    # and each decoding step attends over that padding (several times slower on mixed data).
    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
    for begin in range(0, len(order), size):
        index = order[begin:begin + size]
        try:
            chunk = _run_chunk(stages, [prompts[i] for i in index], policy, config)
        except Exception:  # noqa: BLE001 - isolate the failing request(s)
            logger.exception("batched guard failed; retrying the chunk one request at a time")
            chunk = [result_of(run_one(stages, prompts[i], policy, config, streaming=False)) for i in index]
        for i, result in zip(index, chunk):
            results[i] = result
    return results  # type: ignore[return-value]


def _run_chunk(stages: Stages, prompts: Sequence[PromptInput], policy: Policy,
               config: GenerationConfig) -> list[GuardResult]:
    requests = [Request(p) for p in prompts]
    failed: dict[int, GuardResult] = {}
    for i, request in enumerate(requests):
        try:
            request.messages = to_messages(request.prompt)
        except Exception as exc:  # noqa: BLE001 - a bad request is refused, never passed
            failed[i] = fail(stages, request, exc, policy, config)
    valid = [r for i, r in enumerate(requests) if i not in failed]
    if valid:
        state = stages.score(valid, policy)
        stages.route(valid, policy)
        stages.answer_batch(valid, policy, config, state)
        stages.moderate(valid, policy)
    return [failed[i] if i in failed else assemble(r, policy) for i, r in enumerate(requests)]


def check_many(stages: Stages, items: Sequence[Any], policy: Policy, *, kind: Kind) -> list[Verdict]:
    """The score stage alone, for requests, content or answers (:data:`~mlpm_guard.guardrail.scoring.Kind`):
    a bad item or a failed scoring gets the failed verdict (unsafe, or safe when the policy fails open)."""
    out: list[Verdict | None] = [None] * len(items)
    valid: list[int] = []
    for i, item in enumerate(items):
        try:
            if kind == "request":
                to_messages(item)
            valid.append(i)
        except Exception as exc:  # noqa: BLE001 - fail closed on any bad input
            out[i] = failed_verdict(f"{type(exc).__name__}: {exc}", fail_open=policy.fail_open)
    if valid:
        try:
            verdicts = judge(stages.backbone, stages.prototypes, [items[i] for i in valid], kind=kind)
            for i, v in zip(valid, verdicts):
                out[i] = under_policy(v, policy)
        except Exception as exc:  # noqa: BLE001
            logger.exception("scoring failed")
            for i in valid:
                out[i] = failed_verdict(f"{type(exc).__name__}: {exc}", fail_open=policy.fail_open)
    return out  # type: ignore[return-value]
