"""Sandboxes: suspect jobs run each in a process of its own, beside the worker's other jobs.

A job whose earlier worker died under it may be what killed it (a driver fault, a native
crash, memory blown up by one request), or an innocent that was merely running when
something else killed the process. The worker cannot tell which, so it runs such a
*suspect* in a sandbox: a child process that builds the pool's backend from the same
spec and runs one job at a time. If the job kills the child, only the child dies: the
worker and its other jobs carry on, and the death is evidence against that job alone
(:class:`SandboxCrashed`). An innocent suspect just finishes, at the cost of a process
hop, while the rest of the pool keeps serving new work.

Children are kept between jobs (starting one costs a Python start-up and the backend's
imports) and die with the worker (``PR_SET_PDEATHSIG`` on Linux, else at their next read).
The worker and a child speak length-prefixed msgpack frames over the child's stdin and
stdout; the spec travels on stdin, never in argv (it may name endpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import sys
from typing import BinaryIO

import msgspec

from broker.process import die_with_parent
from broker.wire import Job
from policies.config import PoolSpec
from workers.backend import BackendError, InferenceOutput, TokenSink

_LENGTH = struct.Struct(">I")


class Start(msgspec.Struct, frozen=True, tag=True):
    """First frame to a child: the backend to build."""

    spec: PoolSpec
    faults: bool


class Ready(msgspec.Struct, frozen=True, tag=True):
    """The child built its backend: from now on, its death is the running job's doing."""


class Token(msgspec.Struct, frozen=True, tag=True):
    """Output text of the running job, as generated."""

    text: str


class Done(msgspec.Struct, frozen=True, tag=True):
    output: InferenceOutput


class Failed(msgspec.Struct, frozen=True, tag=True):
    """The backend raised: the worker raises the same :class:`BackendError` in its place."""

    message: str
    retryable: bool
    retry_at: float
    expired: bool


Reply = Ready | Token | Done | Failed
_encoder = msgspec.msgpack.Encoder()
_replies = msgspec.msgpack.Decoder(Reply)


class SandboxCrashed(BackendError):
    """The sandbox died while running the job alone: the job probably kills its process."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


def _frame(message: msgspec.Struct) -> bytes:
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


class _Child:
    """One sandbox process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def read(self) -> Reply:
        assert self.process.stdout is not None
        header = await self.process.stdout.readexactly(_LENGTH.size)
        return _replies.decode(await self.process.stdout.readexactly(_LENGTH.unpack(header)[0]))

    async def run(self, job: Job, on_token: TokenSink | None) -> InferenceOutput:
        assert self.process.stdin is not None
        self.process.stdin.write(_frame(job))
        await self.process.stdin.drain()
        while True:
            reply = await self.read()
            if isinstance(reply, Token):
                if on_token is not None:
                    on_token(reply.text)
            elif isinstance(reply, Done):
                return reply.output
            elif isinstance(reply, Failed):
                raise BackendError(reply.message, retryable=reply.retryable, retry_at=reply.retry_at,
                                   expired=reply.expired)

    async def kill(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        return await self.process.wait()


class Sandboxes:
    """Up to ``slots`` sandbox processes for a pool of ``spec``; each runs one job at a time."""

    def __init__(self, spec: PoolSpec, *, slots: int, faults: bool = False) -> None:
        self.spec = spec
        self.slots = slots
        self.faults = faults
        self.name = f"sandbox:{spec.backend}"
        self.busy = 0
        """Sandboxes running a job now."""
        self._idle: list[_Child] = []

    async def _spawn(self) -> _Child:
        # A sandbox must not outlive its worker: the job it runs belongs to whoever claims it next.
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers.sandbox", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent)
        child = _Child(process)
        assert process.stdin is not None
        process.stdin.write(_frame(Start(spec=self.spec, faults=self.faults)))
        try:
            await child.read()  # Ready
        except (asyncio.IncompleteReadError, ConnectionError):
            # Not the job's doing (it was not sent yet): a plain retryable failure.
            raise BackendError(f"a sandbox did not start (exit code {await child.kill()}); "
                               "see the worker's log", retryable=True) from None
        except BaseException:
            await child.kill()
            raise
        return child

    async def run(self, job: Job, on_token: TokenSink | None = None) -> InferenceOutput:
        """Run ``job`` alone in a sandbox. Raises :class:`SandboxCrashed` if the process dies."""
        if self.busy >= self.slots:
            raise RuntimeError("no sandbox free: the worker takes only as many suspects as it has sandboxes")
        self.busy += 1
        try:
            # A child that died while idle (killed from outside) is not this job's doing.
            self._idle = [c for c in self._idle if c.process.returncode is None]
            child = self._idle.pop() if self._idle else await self._spawn()
            try:
                output = await child.run(job, on_token)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                code = await child.kill()
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                raise SandboxCrashed(f"the process running it alone died ({how})") from exc
            except BackendError:
                self._idle.append(child)  # the job failed, the process is fine
                raise
            except BaseException:
                await child.kill()  # cancelled mid-job (lease lost, shutdown): the run must stop
                raise
            self._idle.append(child)
            return output
        finally:
            self.busy -= 1

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(child.kill() for child in idle))


# ---------------------------------------------------------------------------------- the child


def _read(stream: BinaryIO) -> bytes | None:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None  # the worker closed the pipe (or died): stop
    return stream.read(_LENGTH.unpack(header)[0])


def main() -> None:
    """The child: build the backend from the first frame, then run each job it is sent."""
    from workers.factory import make_backend

    # Frames go to the original stdout; anything the backend prints goes to stderr instead.
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    first = _read(stdin)
    if first is None:
        return
    start = msgspec.msgpack.decode(first, type=Start)
    backend = make_backend(start.spec, faults=start.faults)
    loop = asyncio.new_event_loop()

    def send(message: msgspec.Struct) -> None:
        stdout.write(_frame(message))
        stdout.flush()

    warm_up = getattr(backend, "load", None)
    if warm_up is not None:
        loop.run_until_complete(warm_up())
    send(Ready())
    while (raw := _read(stdin)) is not None:
        job = msgspec.msgpack.decode(raw, type=Job)
        try:
            output = loop.run_until_complete(backend.run(job, on_token=lambda text: send(Token(text))))
        except BackendError as exc:
            send(Failed(str(exc), exc.retryable, exc.retry_at, exc.expired))
        except Exception as exc:  # noqa: BLE001 - reported like the worker reports it in-process
            send(Failed(f"{type(exc).__name__}: {exc}", True, 0.0, False))
        else:
            send(Done(output))
    loop.run_until_complete(backend.aclose())


if __name__ == "__main__":
    main()
