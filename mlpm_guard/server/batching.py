"""Dynamic batching: concurrent requests wait a few milliseconds and share one batched call.

A batch closes when it holds ``max_batch_size`` items or ``max_wait_ms`` after its first item
arrived; while one batch runs, the next one fills, so under load batches grow with concurrency.
Under load the wait stretches to a tenth of the previous batch's run time: callers answered by
one batch send their next request a few milliseconds after the next batch started collecting, and
a fixed short wait would leave them out, so batches would alternate between half sizes.
All lanes of one server share a single model thread: batches never run two at a time on the same
CPU cores.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, Protocol, TypeVar

from ..guardrail import scoring
from ..guardrail.guard import Guard
from ..guardrail.policy import under_policy
from ..model.generation import GenerationConfig
from ..vocabulary.types import GuardResult, Verdict

T = TypeVar("T")
R = TypeVar("R")

Messages = list[dict[str, str]]


class DynamicBatcher(Generic[T, R]):
    """Collects items submitted from many coroutines and runs ``fn`` on lists of them.

    Items are taken round-robin across their owners (one item of each waiting owner in turn), so
    a caller who submitted hundreds of items (the readings of a long request) shares every batch
    with the callers who came after it instead of making them wait for all of its items.

    Args:
        fn: a blocking function from a list of items to the list of their results (same order).
        max_batch_size: most items per call.
        max_wait_ms: how long a batch waits for more items after its first.
        executor: where ``fn`` runs (one worker thread keeps model calls one at a time).
        on_batch: called with the size of each batch (metrics).
        busy_wait_fraction: after a batch of more than one item, the next batch may wait this
            share of that batch's run time (if longer than ``max_wait_ms``) to fill up.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch_size: int, max_wait_ms: float,
                 executor: Executor | None = None, on_batch: Callable[[int], None] | None = None,
                 busy_wait_fraction: float = 0.1) -> None:
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1000.0
        self.executor, self.on_batch, self.busy_wait_fraction = executor, on_batch, busy_wait_fraction
        self._last_size, self._last_run_s = 0, 0.0
        self._waiting: dict[Hashable, collections.deque[tuple[T, asyncio.Future[R]]]] = {}
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: T, owner: Hashable | None = None) -> R:
        """The result of ``item``, computed in a batch with whatever else is waiting.

        ``owner``: whose item it is (items of one owner take turns with other owners' items);
        by default each item is its own owner, which keeps plain first-come order.
        """
        future = self._enqueue(item, owner)
        return await future

    def submit_all(self, items: Sequence[T], owner: Hashable | None = None) -> asyncio.Future[list[R]]:
        """The results of ``items``, all of one owner, queued at once (see :meth:`submit`)."""
        owner = object() if owner is None else owner
        return asyncio.gather(*(self._enqueue(item, owner) for item in items))

    def _enqueue(self, item: T, owner: Hashable | None) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._waiting, self._arrived = {}, asyncio.Event()
            self._worker = loop.create_task(self._run())
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.setdefault(object() if owner is None else owner, collections.deque()).append((item, future))
        assert self._arrived is not None
        self._arrived.set()
        return future

    def _take(self, n: int) -> list[tuple[T, asyncio.Future[R]]]:
        """Up to ``n`` waiting items, one per owner in turn; an owner served goes to the back."""
        out: list[tuple[T, asyncio.Future[R]]] = []
        while len(out) < n and self._waiting:
            for owner in list(self._waiting):
                queue = self._waiting.pop(owner)
                out.append(queue.popleft())
                if queue:
                    self._waiting[owner] = queue  # re-inserted: now last in turn
                if len(out) == n:
                    break
        if not self._waiting:
            assert self._arrived is not None
            self._arrived.clear()
        return out

    async def _collect(self) -> list[tuple[T, asyncio.Future[R]]]:
        assert self._arrived is not None
        await self._arrived.wait()
        wait = self.max_wait
        if self._last_size > 1 and self.max_batch_size > 1:
            wait = max(wait, self.busy_wait_fraction * self._last_run_s)
        batch = self._take(self.max_batch_size)
        deadline = time.monotonic() + wait
        while len(batch) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not self._waiting:
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch += self._take(self.max_batch_size - len(batch))
        # A caller that timed out or disconnected while waiting needs no model time.
        return [(item, fut) for item, fut in batch if not fut.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            items = [item for item, _ in batch]
            start = time.monotonic()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
                self._last_size, self._last_run_s = len(items), time.monotonic() - start
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None


# ---------------------------------------------------------------------- the two model calls a server batches
#: Most padded tokens a scoring batch may spend per real token (see :func:`padding_groups`).
PADDING_SLACK = 1.25


def padding_groups(lengths: Sequence[int], slack: float = PADDING_SLACK) -> list[list[int]]:
    """Indices grouped longest first so that no group pads to more than ``slack`` times its real tokens.

    A request batch holds whatever arrived together; one long prompt would pad every other row to
    its length, and on a CPU the padded tokens cost as much as real ones (on mixed traffic a plain
    batch can score slower than the same prompts one by one).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        # The few-token allowance keeps rows of nearly equal short lengths together.
        if current and lengths[current[0]] * (len(current) + 1) > slack * (real + lengths[i]) + 8:
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        groups.append(current)
    return groups


#: One reading to score, with the prototypes it is scored by (a batch may straddle a hot reload).
Reading = tuple[Messages, Any]


def read_batch(guard: Guard, readings: Sequence[Reading]) -> list[Verdict]:
    """The verdicts of readings from many requests (:func:`mlpm_guard.guardrail.scoring.read`), grouped by
    their prototypes and by length so that no group pads far beyond its real tokens."""
    out: list[Verdict | None] = [None] * len(readings)
    by_prototypes: dict[int, list[int]] = {}
    for i, (_, prototypes) in enumerate(readings):
        by_prototypes.setdefault(id(prototypes), []).append(i)
    for index in by_prototypes.values():
        prototypes = readings[index[0]][1]
        rows = guard.backbone.encode([readings[i][0] for i in index])
        for group in padding_groups([len(r) for r in rows]):
            for k, verdict in zip(group, scoring.read(guard.backbone, prototypes, [readings[index[j]][0] for j in group])):
                out[index[k]] = verdict
    return out  # type: ignore[return-value]


async def judge_in_readings(guard: Guard, item: Any, *, kind: scoring.Kind,
                            read: Callable[[list[Reading]], Awaitable[Sequence[Verdict]]]) -> Verdict:
    """One request's, text's or answer's verdict (:data:`~mlpm_guard.guardrail.scoring.Kind`), its readings
    scored by ``read``.

    The views are planned off the model thread (they only count tokens); the readings, each a short
    forward pass, go to ``read`` together, so a batcher can let them take turns with other
    requests' readings: a long request never holds the model for the whole of its scoring. Errors
    propagate: the caller fails them closed.
    """
    verdict = await _judge_in_readings(guard, item, kind, read)
    if kind == "request":  # as in process: its tool turns are judged as content too
        turns = scoring.tool_turns(item)
        judged = await asyncio.gather(*(_judge_in_readings(guard, text, "content", read) for _, text in turns))
        verdict = scoring.with_tool_turns(verdict, [(k, v) for (k, _), v in zip(turns, judged)])
    # As in process: checks take the policy's tiers; an answer, the output moderation's line (its caller).
    return verdict if kind == "answer" else under_policy(verdict, guard.policy)


async def _judge_in_readings(guard: Guard, item: Any, kind: scoring.Kind,
                             read: Callable[[list[Reading]], Awaitable[Sequence[Verdict]]]) -> Verdict:
    prototypes = guard.prototypes.for_kind(kind)
    plan = await asyncio.to_thread(scoring.plan, guard.backbone, [item], kind=kind)
    scored = await read([(r, prototypes) for r in plan.readings])
    return scoring.decide(prototypes, plan, list(scored))[0]


def answer_batch(guard: Guard, items: Sequence[tuple[Messages, GenerationConfig]]) -> list[GuardResult]:
    """Guarded answers of many requests; requests with the same decoding settings share a ``Guard.batch``."""
    out: list[GuardResult | None] = [None] * len(items)
    groups: dict[GenerationConfig, list[int]] = {}
    for i, (_, config) in enumerate(items):
        groups.setdefault(config, []).append(i)
    for config, index in groups.items():
        results = guard.batch([items[i][0] for i in index], **config.model_dump())
        for i, result in zip(index, results):
            out[i] = result
    return out  # type: ignore[return-value]


class Lanes(Protocol):
    """The awaitable model calls the app makes: ``score`` and ``answer``.

    The local server backs them with :class:`DynamicBatcher`; the Ray Serve deployment backs
    them with ``serve.batch`` methods (see :mod:`mlpm_guard.server.ray_serve`).
    """

    async def score(self, prompt: Messages) -> Verdict: ...

    async def score_answer(self, messages: Messages, text: str) -> Verdict: ...

    async def answer(self, prompt: Messages, config: GenerationConfig) -> GuardResult: ...

    async def close(self) -> None: ...


class BatchedLanes:
    """The model calls through dynamic batchers that share one model thread.

    Scoring goes by readings (:func:`judge_in_readings`): each request's readings are queued as
    one owner's items, so batches take them in turn with other requests' readings.
    """

    def __init__(self, guard: Guard, *, max_batch_size: int, max_wait_ms: float, executor: Executor,
                 on_batch: Callable[[str, int], None] | None = None) -> None:
        def observer(lane: str) -> Callable[[int], None] | None:
            return None if on_batch is None else (lambda n: on_batch(lane, n))

        options: dict[str, Any] = {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "executor": executor}
        self.guard = guard
        self._read = DynamicBatcher(lambda items: read_batch(guard, items), on_batch=observer("score"), **options)
        self._answer = DynamicBatcher(lambda items: answer_batch(guard, items), on_batch=observer("answer"), **options)

    async def score(self, prompt: Messages) -> Verdict:
        return await judge_in_readings(self.guard, prompt, kind="request", read=self._read_all)

    async def score_answer(self, messages: Messages, text: str) -> Verdict:
        return await judge_in_readings(self.guard, scoring.Answer(messages, text), kind="answer", read=self._read_all)

    def _read_all(self, readings: list[Reading]) -> Awaitable[list[Verdict]]:
        return self._read.submit_all(readings)

    async def answer(self, prompt: Messages, config: GenerationConfig) -> GuardResult:
        return await self._answer.submit((prompt, config))

    async def close(self) -> None:
        await self._read.close()
        await self._answer.close()
