"""Merge async iterators: the items of all of them, each as soon as its source has it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def merge(sources: list[AsyncGenerator[T, None]]) -> AsyncIterator[T]:
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
