"""A simulated device: waits on timers to follow a device profile, never burns CPU.

TTFT and inter-token latency come from ``policies.profiles`` as functions of prompt length
and of the jobs in flight on this device *now*: decoding advances in chunks and re-reads
the concurrency before each, so a job slows down when others join and speeds up when
they leave, as on a real batch-serving GPU. Past the profile's hard concurrency cap (an
accelerator's), the device answers like a hosted API: 429, :class:`CapacityExceeded`.

With ``faults`` on (``IB_FAULT_INJECTION=1``, for tests and drills), a job's metadata key
``fault`` makes it fail after its first token is due: ``transient`` (retryable),
``permanent``, or ``crash`` (the worker process exits at once).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import time
from collections.abc import Awaitable, Callable

from broker.wire import Job
from policies.profiles import PROFILES, DeviceProfile
from workers.backend import BackendError, CapacityExceeded, InferenceOutput, TokenSink

DECODE_CHUNK = 32
"""Tokens decoded between concurrency re-reads: the granularity of the simulation."""
EMBEDDING_DIM = 8


def fake_embedding(text: str) -> list[float]:
    """A small deterministic vector standing in for a real embedding."""
    digest = hashlib.blake2b(text.encode(), digest_size=EMBEDDING_DIM * 4).digest()
    return [round(v / 2**32, 6) for v in struct.unpack(f"<{EMBEDDING_DIM}I", digest)]


class SimulatedBackend:
    """A device of one :class:`DeviceProfile`; ``clock`` and ``sleep`` are injectable."""

    def __init__(self, profile: DeviceProfile | str, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, faults: bool = False) -> None:
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.name = f"simulated:{self.profile.name}"
        self.clock = clock
        self.sleep = sleep
        self.in_flight = 0
        self.faults = faults

    def _inject(self, job: Job) -> None:
        # Fault drills: only with fault injection on, a job's metadata can make it fail.
        fault = job.metadata.get("fault")
        if fault == "transient":
            raise BackendError("injected transient fault", retryable=True)
        if fault == "permanent":
            raise BackendError("injected permanent fault")
        if fault == "crash":
            os._exit(70)  # as if the device driver took the process down

    async def run(self, job: Job, on_token: TokenSink | None = None) -> InferenceOutput:
        model = self.profile.model(job.model)
        if model is None:
            raise BackendError(f"device {self.profile.name!r} does not run model {job.model!r}")
        cap = self.profile.max_concurrency
        if cap is not None and self.in_flight >= cap:
            raise CapacityExceeded(f"device {self.profile.name!r} is at its cap of {cap} concurrent jobs")
        self.in_flight += 1
        try:
            prompt = job.prompt_tokens()
            ttft = model.ttft(prompt, self.in_flight)
            if ttft > 0:  # an instant device answers without a trip through the event loop
                await self.sleep(ttft / 1000)
            if self.faults:
                self._inject(job)
            first = self.clock()
            if job.kind == "embedding":
                texts = job.texts or []
                return InferenceOutput(first_token_at=first, finished_at=first, prompt_tokens=prompt,
                                       completion_tokens=0, embeddings=[fake_embedding(t) for t in texts])
            if on_token is not None:
                on_token("tok ")
            remaining = max(0, job.max_tokens - 1)
            while remaining > 0:
                chunk = min(DECODE_CHUNK, remaining)
                await self.sleep(chunk * model.itl(self.in_flight) / 1000)
                remaining -= chunk
                if on_token is not None:
                    on_token("tok " * chunk)
            tokens = max(1, job.max_tokens)
            return InferenceOutput(first_token_at=first, finished_at=self.clock(), prompt_tokens=prompt,
                                   completion_tokens=tokens,
                                   output=f"[{tokens} tokens from simulated {self.profile.name} {job.model}]")
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        return None
