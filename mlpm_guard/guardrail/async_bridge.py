"""From the guard's synchronous, model-bound work to asyncio: an iterator produced on a worker
thread and consumed on the event loop, so the loop keeps running while the model works.

(A single call needs no more than :func:`asyncio.to_thread`.)
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


async def iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """The items of ``make()``, produced on a worker thread and handed to the event loop one by one.

    ``make`` runs on the worker too (in a copy of the caller's context), and an exception it or
    the iterator raises reaches the consumer. Leaving the loop early (``break``, ``aclose`` or
    cancellation) stops the producer at its next item and closes its iterator, so a model
    stops decoding at the next token.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            items = make()
            try:
                for item in items:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    worker = loop.run_in_executor(None, contextvars.copy_context().run, produce)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        if worker.done():
            worker.result()
