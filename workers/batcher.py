"""Dynamic batching: concurrent callers' items go through one blocking call together.

Each caller submits a list of items (an embedding job's texts) and awaits its results. A
single loop collects queued items into a batch of at most ``max_batch``, waiting at most
``max_wait_s`` after the oldest waiting item arrived for others to join (Triton's "max queue
delay"), runs the batch function in a worker thread and hands each caller its own results,
in its own order. A caller's items may span several batches when it has more than fit; it
is done when its last item is. One batch runs at a time: while it runs, the next one fills.

The batch function runs in one dedicated thread: a PyTorch forward pass releases the GIL,
so the event loop keeps serving the worker's I/O while the model computes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


class _Request(Generic[T, R]):
    """One caller's items, its results as they come in, and the future it waits on."""

    def __init__(self, items: list[T], future: asyncio.Future[float]) -> None:
        self.items = items
        self.results: list[R | None] = [None] * len(items)
        self.scheduled = 0
        """Items handed to a batch so far (they are scheduled in order)."""
        self.remaining = len(items)
        self.future = future
        self.arrived = time.monotonic()


class DynamicBatcher(Generic[T, R]):
    """Runs ``fn`` over batches of items from concurrent :meth:`submit` calls.

    ``fn`` takes a list of items and returns one result per item, in order. ``clock`` stamps
    the instant each batch finished (the callers' completion time).
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], *, max_batch: int, max_wait_s: float,
                 executor: ThreadPoolExecutor, clock: Callable[[], float] = time.time) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, not {max_wait_s}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.executor = executor
        self.clock = clock
        self.passes = 0
        """Batches run so far (for tests and benchmarks)."""
        self.items = 0
        """Items run so far."""
        self._queue: deque[_Request[T, R]] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: list[tuple[_Request[T, R], int]] = []

    async def submit(self, items: Sequence[T]) -> tuple[list[R], float]:
        """Results for ``items`` in order, and when the batch holding the last of them finished."""
        if not items:
            return [], self.clock()
        request: _Request[T, R] = _Request(list(items), asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="dynamic-batcher")
        # Cancelling this call cancels the future too; the loop then skips what is left of it.
        finished = await request.future
        return cast(list[R], request.results), finished

    def _pending(self) -> int:
        return sum(len(r.items) - r.scheduled for r in self._queue)

    def _drop_done(self) -> None:
        # A cancelled caller, or one whose earlier batch failed, needs nothing more.
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
        if any(r.future.done() for r in self._queue):
            self._queue = deque(r for r in self._queue if not r.future.done())

    async def _fill(self) -> None:
        """Wait until a full batch is queued or the oldest queued item has waited ``max_wait_s``."""
        deadline = self._queue[0].arrived + self.max_wait_s
        while self._pending() < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return
            self._drop_done()
            if not self._queue:
                return

    def _take(self) -> list[tuple[_Request[T, R], int]]:
        """Up to ``max_batch`` queued items, oldest caller first, as (request, index) pairs."""
        batch: list[tuple[_Request[T, R], int]] = []
        while self._queue and len(batch) < self.max_batch:
            request = self._queue[0]
            n = min(self.max_batch - len(batch), len(request.items) - request.scheduled)
            batch += [(request, i) for i in range(request.scheduled, request.scheduled + n)]
            request.scheduled += n
            if request.scheduled == len(request.items):
                self._queue.popleft()
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._drop_done()
                if not self._queue:
                    return  # the next submit starts a new loop
                await self._fill()
                batch = self._running = self._take()
                if not batch:
                    continue
                try:
                    out = await loop.run_in_executor(self.executor, self.fn, [req.items[i] for req, i in batch])
                    if len(out) != len(batch):
                        raise RuntimeError(f"batch function returned {len(out)} results for {len(batch)} items")
                except Exception as exc:  # noqa: BLE001 - every caller in the batch gets the error
                    for req, _ in batch:
                        if not req.future.done():
                            req.future.set_exception(exc)
                    continue
                finished = self.clock()
                self._running = []
                self.passes += 1
                self.items += len(batch)
                for (req, i), result in zip(batch, out, strict=True):
                    req.results[i] = result
                    req.remaining -= 1
                    if req.remaining == 0 and not req.future.done():
                        req.future.set_result(finished)
        finally:
            self._fail_waiting()  # closing (task cancelled) or a bug

    def _fail_waiting(self) -> None:
        # Nobody may wait forever on a queued request.
        for req in [*self._queue, *(req for req, _ in self._running)]:
            if not req.future.done():
                req.future.set_exception(RuntimeError("the batcher stopped before running this request"))

    async def aclose(self) -> None:
        """Stop the loop; callers still waiting get an error."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        # A loop cancelled before its first step never ran its own cleanup.
        self._fail_waiting()
