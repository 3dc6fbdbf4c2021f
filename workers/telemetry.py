"""What a pool worker tells the policy: its load, and the timings of the jobs it finished.

Both go out in one heartbeat (:class:`broker.wire.Heartbeat`, a field of the pool's
heartbeat hash): the policy's estimates learn from the timings, its routing reads the load.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import redis.asyncio as aioredis

from broker.wire import Heartbeat, Metrics, ObservedJob, Timing, json_encode

MAX_OBSERVATIONS = 256
"""Most job timings one heartbeat carries."""


class Telemetry:
    """The heartbeats of worker ``name`` in hash ``key``: ``capacity`` slots, ``in_flight()`` taken.

    ``cooling_until()``, where the backend has one, says until when all its endpoints refuse work.
    """

    def __init__(self, client: aioredis.Redis, key: str, name: str, *, capacity: int,
                 in_flight: Callable[[], int], clock: Callable[[], float],
                 cooling_until: Callable[[], float | None] | None = None) -> None:
        self.client = client
        self.key = key
        self.name = name
        self.capacity = capacity
        self.in_flight = in_flight
        self.clock = clock
        self.cooling_until = cooling_until
        self.observations: collections.deque[ObservedJob] = collections.deque(maxlen=MAX_OBSERVATIONS)
        """Timings of jobs finished since the last heartbeat, what the policy learns from, the freshest if more."""
        self.seq = 0

    def observe(self, model: str, prompt: int, output: int, concurrency: int, t: Timing, m: Metrics) -> None:
        """Keep a finished job's timings for the next beat (``concurrency``: the jobs running beside it)."""
        self.observations.append(ObservedJob(
            model=model, prompt_tokens=prompt, output_tokens=output, concurrency=concurrency,
            ttft_ms=(t.first_token_at - t.started_at) * 1000, tpot_ms=m.time_per_output_token_ms, at=t.finished_at))

    async def beat(self) -> None:
        """Tell the policy this worker's load, and the timings of the jobs it finished since."""
        sent = list(self.observations)
        self.observations.clear()
        beat = Heartbeat(ts=self.clock(), in_flight=self.in_flight(), capacity=self.capacity, seq=self.seq + 1,
                         obs=sent, cooling_until=self.cooling_until() if self.cooling_until is not None else None)
        try:
            await self.client.hset(self.key, self.name, json_encode(beat))  # type: ignore[arg-type,misc]
        except BaseException:
            # A failed write keeps the timings for the next beat (the freshest, if too many).
            self.observations = collections.deque([*sent, *self.observations], maxlen=MAX_OBSERVATIONS)
            raise
        self.seq += 1

    async def remove(self) -> None:
        """Remove this worker's heartbeat (on stop); if this never happens, the janitor expires it."""
        await self.client.hdel(self.key, self.name)  # type: ignore[misc]
