"""Dynamic batching: concurrent requests wait a few milliseconds and share one batched call.

A batch closes when it holds ``max_batch_size`` items or ``max_wait_ms`` after its first item
arrived; while one batch runs, the next one fills, so under load batches grow with concurrency.
Under load the wait stretches to a tenth of the previous batch's run time: callers answered by
one batch send their next request a few milliseconds after the next batch started collecting, and
a fixed 5 ms wait left them out, so batches alternated between half sizes (8 and 8 at 16 clients).
All lanes of one server share a single model thread: batches never run two at a time on the same
CPU cores.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, Protocol, TypeVar

from ..generation import GenerationConfig
from ..guard import Guard
from ..types import GuardResult, Verdict

T = TypeVar("T")
R = TypeVar("R")

Messages = list[dict[str, str]]


class DynamicBatcher(Generic[T, R]):
    """Collects items submitted from many coroutines and runs ``fn`` on lists of them.

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
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """The result of ``item``, computed in a batch with whatever else is waiting."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        assert self._queue is not None
        self._queue.put_nowait((item, future))
        return await future

    async def _collect(self) -> list[tuple[T, asyncio.Future[R]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        wait = self.max_wait
        if self._last_size > 1 and self.max_batch_size > 1:
            wait = max(wait, self.busy_wait_fraction * self._last_run_s)
        deadline = time.monotonic() + wait
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
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
    its length, and on a CPU the padded tokens cost as much as real ones (on mixed chat traffic a
    plain batch of 16 scored slower than the same prompts one by one).
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


def score_batch(guard: Guard, prompts: Sequence[Messages]) -> list[Verdict]:
    """Verdicts of many prompts: ``Guard.check_batch`` on groups of similar length.

    Lengths are counted after the chat template's opening that all rows share (the backbone
    reuses its KV cache), since only the rest runs through the model.
    """
    prompts = list(prompts)
    if len(prompts) == 1:
        return guard.check_batch(prompts)
    try:
        ids = [row.ids for row in guard.backbone.encode(prompts)]
    except Exception:  # noqa: BLE001 - check_batch reports bad prompts one by one
        return guard.check_batch(prompts)
    shared = len(os.path.commonprefix(ids))
    out: list[Verdict | None] = [None] * len(prompts)
    for group in padding_groups([len(r) - shared for r in ids]):
        for i, verdict in zip(group, guard.check_batch([prompts[i] for i in group])):
            out[i] = verdict
    return out  # type: ignore[return-value]


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

    async def answer(self, prompt: Messages, config: GenerationConfig) -> GuardResult: ...

    async def close(self) -> None: ...


class BatchedLanes:
    """Both model calls through dynamic batchers that share one model thread."""

    def __init__(self, guard: Guard, *, max_batch_size: int, max_wait_ms: float, executor: Executor,
                 on_batch: Callable[[str, int], None] | None = None) -> None:
        def observer(lane: str) -> Callable[[int], None] | None:
            return None if on_batch is None else (lambda n: on_batch(lane, n))

        options: dict[str, Any] = {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "executor": executor}
        self._score = DynamicBatcher(lambda items: score_batch(guard, items), on_batch=observer("score"), **options)
        self._answer = DynamicBatcher(lambda items: answer_batch(guard, items), on_batch=observer("answer"), **options)

    async def score(self, prompt: Messages) -> Verdict:
        return await self._score.submit(prompt)

    async def answer(self, prompt: Messages, config: GenerationConfig) -> GuardResult:
        return await self._answer.submit((prompt, config))

    async def close(self) -> None:
        await self._score.close()
        await self._answer.close()
