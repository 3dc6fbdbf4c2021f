"""Dynamic batching rules, with a stand-in batch function (no model, no torch)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import pytest_asyncio

from workers.batcher import DynamicBatcher


class Doubler:
    """A batch function that records every batch it is given."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.entered.set()
        self.gate.wait(5)
        self.batches.append(items)
        if -1 in items:
            raise ValueError("bad item")
        return [2 * x for x in items]


@pytest.fixture
def fn() -> Doubler:
    return Doubler()


@pytest_asyncio.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


def batcher(fn: Doubler, executor: ThreadPoolExecutor, max_batch: int = 8,
            max_wait_s: float = 0.05) -> DynamicBatcher[int, int]:
    return DynamicBatcher(fn, max_batch=max_batch, max_wait_s=max_wait_s, executor=executor)


async def test_concurrent_callers_share_one_batch_and_get_their_own_results(fn: Doubler,
                                                                            executor: ThreadPoolExecutor) -> None:
    b = batcher(fn, executor)
    out = await asyncio.gather(b.submit([1, 2]), b.submit([3]), b.submit([4, 5, 6]))
    assert [r for r, _ in out] == [[2, 4], [6], [8, 10, 12]]
    assert fn.batches == [[1, 2, 3, 4, 5, 6]] and b.passes == 1 and b.items == 6
    assert len({finished for _, finished in out}) == 1  # all finished with the one batch


async def test_batches_hold_at_most_max_batch_items_and_a_big_caller_spans_several(
        fn: Doubler, executor: ThreadPoolExecutor) -> None:
    b = batcher(fn, executor, max_batch=4)
    (big, big_done), (small, small_done) = await asyncio.gather(b.submit(list(range(10))), b.submit([100]))
    assert big == [2 * x for x in range(10)] and small == [200]
    assert fn.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 100]]
    assert big_done == small_done  # both finished with the third batch


async def test_a_full_batch_does_not_wait_and_a_lone_item_waits_at_most_max_wait(
        fn: Doubler, executor: ThreadPoolExecutor) -> None:
    b = batcher(fn, executor, max_batch=4, max_wait_s=10.0)
    start = time.monotonic()
    await asyncio.gather(*(b.submit([i]) for i in range(4)))
    assert time.monotonic() - start < 2.0  # not the 10 s max wait

    b = batcher(fn, executor, max_batch=4, max_wait_s=0.2)
    start = time.monotonic()
    await b.submit([1])
    assert 0.15 <= time.monotonic() - start < 2.0


async def test_a_caller_arriving_during_a_pass_joins_the_next_batch(fn: Doubler,
                                                                    executor: ThreadPoolExecutor) -> None:
    b = batcher(fn, executor, max_wait_s=0.0)
    fn.gate.clear()
    first = asyncio.create_task(b.submit([1]))
    assert await asyncio.to_thread(fn.entered.wait, 5)  # the first batch is in the thread, held at the gate
    later = [asyncio.create_task(b.submit([i])) for i in (2, 3, 4)]
    await asyncio.sleep(0)  # one loop turn: each new task runs to its first await, its items queued
    fn.gate.set()
    await asyncio.gather(first, *later)
    assert fn.batches == [[1], [2, 3, 4]]


async def test_a_failed_batch_fails_only_its_callers(fn: Doubler, executor: ThreadPoolExecutor) -> None:
    b = batcher(fn, executor, max_batch=2)
    bad, good = await asyncio.gather(b.submit([-1, 1]), b.submit([2]), return_exceptions=True)
    assert isinstance(bad, ValueError)
    assert isinstance(good, tuple) and good[0] == [4]
    assert (await b.submit([5]))[0] == [10]  # the loop goes on


async def test_a_cancelled_callers_items_are_not_run(fn: Doubler, executor: ThreadPoolExecutor) -> None:
    b = batcher(fn, executor, max_wait_s=0.0)
    fn.gate.clear()
    first = asyncio.create_task(b.submit([1]))
    assert await asyncio.to_thread(fn.entered.wait, 5)
    gone = asyncio.create_task(b.submit([2]))
    kept = asyncio.create_task(b.submit([3]))
    await asyncio.sleep(0)  # one loop turn: each new task runs to its first await, its items queued
    gone.cancel()
    fn.gate.set()
    assert (await first)[0] == [2] and (await kept)[0] == [6]
    assert fn.batches == [[1], [3]]


async def test_closing_fails_waiting_callers(fn: Doubler, executor: ThreadPoolExecutor) -> None:
    b = batcher(fn, executor, max_wait_s=10.0)
    waiting = asyncio.create_task(b.submit([1]))
    await asyncio.sleep(0)  # one loop turn: each new task runs to its first await, its items queued
    await b.aclose()
    with pytest.raises(RuntimeError, match="stopped"):
        await waiting


async def test_empty_submit_and_bad_settings(fn: Doubler, executor: ThreadPoolExecutor) -> None:
    assert (await batcher(fn, executor).submit([]))[0] == [] and not fn.batches
    with pytest.raises(ValueError, match="max_batch"):
        batcher(fn, executor, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        batcher(fn, executor, max_wait_s=-1)
