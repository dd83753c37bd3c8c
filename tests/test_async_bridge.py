"""The async bridge: an iterator produced on a worker thread and consumed on the event loop."""

import asyncio
import threading

import pytest

from mlpm_guard.guardrail.async_bridge import iterate_in_thread


def test_items_arrive_in_order_from_another_thread():
    threads = set()

    def numbers():
        for i in range(5):
            threads.add(threading.get_ident())
            yield i

    async def main():
        return [i async for i in iterate_in_thread(numbers)]

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
    assert threading.get_ident() not in threads


def _bad_settings():  # fails when the iterator is made, as `Guard.stream` does on a bad keyword
    raise ValueError("bad settings")


def _fails_on_the_way():
    yield 1
    raise ValueError("bad settings")


@pytest.mark.parametrize("make", [_bad_settings, _fails_on_the_way])
def test_errors_reach_the_consumer_instead_of_hanging(make):
    async def main():
        return [i async for i in iterate_in_thread(make)]

    with pytest.raises(ValueError, match="bad settings"):
        asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_leaving_early_closes_the_producer():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                i += 1
                yield i
        finally:
            closed.set()

    async def main():
        items = iterate_in_thread(endless)
        first = await items.__anext__()
        await items.aclose()
        return first

    assert asyncio.run(main()) == 1
    assert closed.wait(timeout=30)
