"""Producer and collector for inference-broker, through the public SDK only.

The producer submits with :meth:`broker.client.Client.submit_many` (pipelined, the SDK's
bulk call); the collector follows the jobs' result stream through a consumer group with
:meth:`broker.client.Client.results` (``--via group``, the default: what a consumer of
many results does) or awaits each job with :meth:`broker.client.Client.result`
(``--via wait``). Jobs go to the benchmark pool (``bench/bench.toml``) whose device is
instant, so each result's latency is what the broker added: the SDK stamps
``created_at`` at submission and the result carries it back in its timing. ::

    python -m bench.broker_load produce|collect --redis-url URL --run PREFIX --reply NAME --n N [--rate R]
                                                [--shards S]

With ``--shards S`` (``bench.shards``) the client addresses a deployment of S shards: each
job goes to its shard's ingress, and the collector follows every shard's result stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import uvloop

from bench.peers.loadgen import Report, cpu_seconds, next_slice, parse_args, ready
from broker.client import Client
from broker.errors import Backpressure, ResultTimeout
from broker.wire import Job, Result

MODEL = "noop"
"""The only model of the benchmark pool."""


def job(run: str, reply: str, i: int) -> Job:
    return Job(id=f"{reply}-{i}", model=MODEL, kind="completion", prompt="x", max_tokens=1, reply_to=reply)


async def paced(n: int, rate: float, chunk: int) -> AsyncIterator[tuple[int, int, float]]:
    """``loadgen.schedule`` for an event loop: the same slices, with sleeps that let the SDK run."""
    begin, i = time.time(), 0
    while i < n:
        step = next_slice(i, n, rate, chunk, begin, time.time())
        if isinstance(step, float):
            await asyncio.sleep(step)
            continue
        yield step
        i = step[1]


async def produce(url: str, run: str, reply: str, n: int, rate: float, chunk: int, out: str,
                  shards: int = 1) -> None:
    report = Report(first=time.time())
    cpu0 = cpu_seconds()
    async with Client(url, prefix=run, shards=shards) as client:
        async for start, stop, due in paced(n, rate, chunk):
            if due:
                report.behind_ms = max(report.behind_ms, (time.time() - due) * 1000)
            batch = [job(run, reply, i) for i in range(start, stop)]
            while batch:
                try:
                    await client.submit_many(batch, chunk=chunk)
                    batch = []
                except Backpressure as exc:
                    # The ingress is full (memory mode pushes more than max_backlog): wait for
                    # the policy workers, then resubmit what did not go in.
                    report.errors += 1
                    went_in = set(exc.accepted)
                    batch = [j for j in batch if j.id not in went_in]
                    await asyncio.sleep(0.05)
            report.count = stop
    report.last = time.time()
    report.cpu_s = cpu_seconds() - cpu0
    report.write(out)


def _record(report: Report, result: Result) -> None:
    report.result(result.timing.created_at if result.status == "ok" and result.timing else None)


async def collect(url: str, run: str, reply: str, n: int, timeout: float, via: str, out: str,
                  shards: int = 1) -> None:
    report = Report()
    async with Client(url, prefix=run, shards=shards) as client:
        cpu0 = cpu_seconds()
        try:
            async with asyncio.timeout(timeout):
                if via == "group":
                    results = client.results("bench", f"c{run}", reply_to=reply, count=500)
                    ready()
                    async for result in results:
                        _record(report, result)
                        if report.count >= n:
                            break
                else:
                    ready()
                    # In submission order: by the time one is seen, the ones before it are done.
                    for i in range(n):
                        _record(report, await client.result(job(run, reply, i).id, timeout=timeout,
                                                            reply_to=reply))
        except (TimeoutError, ResultTimeout):
            report.note = f"timed out with {report.count} of {n} results"
        report.cpu_s = cpu_seconds() - cpu0
    report.write(out)


def main() -> None:
    args = parse_args()
    if args.mode == "produce":
        uvloop.run(produce(args.redis_url, args.run, args.reply, args.n, args.rate, args.chunk, args.out,
                           args.shards))
    elif args.mode == "collect":
        uvloop.run(collect(args.redis_url, args.run, args.reply, args.n, args.timeout, args.via, args.out,
                           args.shards))
    else:
        raise SystemExit("the broker's workers run as `python -m cli worker`")


if __name__ == "__main__":
    main()
