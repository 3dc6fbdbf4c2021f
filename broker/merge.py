"""Merge async iterators: the items of all of them, each as soon as its source has it, or in order."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def merge(sources: list[AsyncGenerator[T, None]]) -> AsyncGenerator[T, None]:
    """Yield the items of ``sources`` as they come, until every one is exhausted.

    A source is asked for its next item only once the consumer is done with its last one
    (the body of the caller's loop ran), as if the caller iterated it alone: a source that
    acks what it yielded on its next step (:meth:`broker.client.Client.results`) still acks
    only handled items. Closing the merge cancels the pending steps and closes every source.
    """
    if len(sources) == 1:  # one shard: no tasks in between
        async for item in sources[0]:
            yield item
        return
    steps = {asyncio.ensure_future(anext(source)): source for source in sources}
    try:
        while steps:
            done, _ = await asyncio.wait(steps, return_when=asyncio.FIRST_COMPLETED)
            for step in done:
                source = steps.pop(step)
                try:
                    item = step.result()
                except StopAsyncIteration:
                    continue
                yield item
                steps[asyncio.ensure_future(anext(source))] = source
    finally:
        for step in steps:
            step.cancel()
        await asyncio.gather(*steps, return_exceptions=True)
        for source in sources:
            await source.aclose()


async def merge_in_order(sources: list[AsyncGenerator[T, None]], key: Callable[[T], Any]) -> AsyncGenerator[T, None]:
    """Yield the items of finite ``sources``, each already sorted by ``key``, in ``key`` order.

    An async :func:`heapq.merge`: it holds one item per source, and asks a source for its
    next item once its last one was consumed (as :func:`merge` does). Closing it closes
    every source.
    """
    heads: list[tuple[Any, int, T]] = []
    try:
        for i, source in enumerate(sources):
            async for item in source:
                heads.append((key(item), i, item))
                break
        heapq.heapify(heads)
        while heads:
            _key, i, item = heads[0]
            yield item
            async for after in sources[i]:
                heapq.heapreplace(heads, (key(after), i, after))
                break
            else:
                heapq.heappop(heads)
    finally:
        for source in sources:
            await source.aclose()
