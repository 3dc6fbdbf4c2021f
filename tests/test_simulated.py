"""The simulated device follows its profile on a virtual clock, and waits rather than computes."""

from __future__ import annotations

import asyncio

import pytest

from broker.wire import ChatMessage, Job
from policies.profiles import PROFILES
from workers.backend import BackendError, CapacityExceeded
from workers.simulated import SimulatedBackend


class VirtualClock:
    """Time that only moves when the backend sleeps: every wait must go through ``sleep``."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def chat(tokens_in: int, tokens_out: int, model: str = "llama-3.1-8b") -> Job:
    return Job(id="j", model=model, kind="chat", max_tokens=tokens_out,
               messages=[ChatMessage("user", "x" * (4 * tokens_in))])


async def test_one_job_takes_ttft_plus_decode_from_the_profile() -> None:
    clock = VirtualClock()
    backend = SimulatedBackend("h100", clock=clock.time, sleep=clock.sleep)
    start = clock.now
    out = await backend.run(chat(1000, 101))
    model = PROFILES["h100"].models["llama-3.1-8b"]
    assert out.first_token_at - start == pytest.approx(model.ttft(1000, 1) / 1000)
    assert out.finished_at - out.first_token_at == pytest.approx(100 * model.itl(1) / 1000)
    assert (out.prompt_tokens, out.completion_tokens) == (1000, 101)


async def test_concurrent_jobs_slow_each_other_down() -> None:
    clock = VirtualClock()
    backend = SimulatedBackend("h100", clock=clock.time, sleep=clock.sleep)
    alone = await backend.run(chat(1000, 200))
    clock2 = VirtualClock()
    busy = SimulatedBackend("h100", clock=clock2.time, sleep=clock2.sleep)
    outs = await asyncio.gather(*(busy.run(chat(1000, 200)) for _ in range(50)))
    decode_alone = alone.finished_at - alone.first_token_at
    # Each of 50 concurrent jobs sees a higher inter-token latency than a job alone.
    assert all(o.finished_at - o.first_token_at > decode_alone * 1.1 for o in outs)
    assert backend.in_flight == busy.in_flight == 0


async def test_accelerator_refuses_work_past_its_cap() -> None:
    clock = VirtualClock()
    backend = SimulatedBackend("accel", clock=clock.time, sleep=clock.sleep)
    cap = PROFILES["accel"].max_concurrency
    assert cap is not None
    running = [asyncio.create_task(backend.run(chat(100, 50))) for _ in range(cap)]
    await asyncio.sleep(0)
    with pytest.raises(CapacityExceeded):
        await backend.run(chat(100, 50))
    await asyncio.gather(*running)


async def test_unknown_model_is_a_backend_error() -> None:
    backend = SimulatedBackend("accel")
    with pytest.raises(BackendError, match="minilm-l6"):
        await backend.run(Job(id="e", model="minilm-l6", kind="embedding", texts=["a"]))


async def test_embeddings_have_no_decode_phase() -> None:
    clock = VirtualClock()
    backend = SimulatedBackend("h100", clock=clock.time, sleep=clock.sleep)
    out = await backend.run(Job(id="e", model="minilm-l6", kind="embedding", texts=["a", "b", "c"]))
    assert out.first_token_at == out.finished_at and out.completion_tokens == 0
    assert out.embeddings is not None and len(out.embeddings) == 3
    assert len(clock.slept) == 1  # prefill only
