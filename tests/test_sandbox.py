"""Sandboxes (workers/sandbox.py): jobs run in real child processes built from the pool spec."""

from __future__ import annotations

import asyncio

import pytest

from broker.config import load_config
from broker.wire import Job
from tests.helpers import eventually
from workers.backend import BackendError
from workers.sandbox import SandboxCrashed, Sandboxes

GPU = load_config().pools["gpu"]


def completion(tokens: int, **metadata: str) -> Job:
    return Job(id="j", model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=tokens, metadata=metadata)


async def test_a_job_runs_in_a_child_with_its_tokens_streamed_back_and_the_child_is_kept() -> None:
    sandboxes = Sandboxes(GPU, slots=1, faults=True)
    try:
        tokens: list[str] = []
        out = await sandboxes.run(completion(8), on_token=tokens.append)
        assert out.completion_tokens == 8 and out.output and out.finished_at >= out.first_token_at
        assert "".join(tokens) == "tok " * 8  # what the simulated device streams
        first = sandboxes._idle[0].process.pid
        await sandboxes.run(completion(2))
        assert sandboxes._idle[0].process.pid == first  # one start-up serves many jobs
    finally:
        await sandboxes.aclose()


async def test_a_job_that_kills_its_process_kills_only_the_sandbox() -> None:
    sandboxes = Sandboxes(GPU, slots=1, faults=True)
    try:
        with pytest.raises(SandboxCrashed, match=r"the process running it alone died \(exit code 70\)") as caught:
            await sandboxes.run(completion(4, fault="crash"))
        assert caught.value.retryable and not sandboxes._idle
        assert (await sandboxes.run(completion(2))).completion_tokens == 2  # a fresh child
    finally:
        await sandboxes.aclose()


async def test_a_backend_error_in_the_child_is_the_same_error_here_and_keeps_the_child() -> None:
    sandboxes = Sandboxes(GPU, slots=1, faults=True)
    try:
        with pytest.raises(BackendError, match="injected permanent fault") as caught:
            await sandboxes.run(completion(4, fault="permanent"))
        assert not caught.value.retryable and not isinstance(caught.value, SandboxCrashed)
        with pytest.raises(BackendError, match="does not run model"):
            await sandboxes.run(Job(id="j", model="no-such-model", kind="completion", prompt="p", max_tokens=1))
        assert len(sandboxes._idle) == 1
    finally:
        await sandboxes.aclose()


async def test_a_cancelled_run_kills_its_child_and_frees_the_slot() -> None:
    sandboxes = Sandboxes(GPU, slots=1, faults=True)
    await sandboxes.run(completion(1))  # started and idle
    child = sandboxes._idle[0]
    run = asyncio.create_task(sandboxes.run(completion(5000)))  # ~25 s on the simulated device

    async def running() -> bool:
        return sandboxes.busy == 1 and not sandboxes._idle

    await eventually(running, timeout=10, what="the long job to run in the child")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert child.process.returncode is not None and sandboxes.busy == 0
    await sandboxes.aclose()
