"""arq peer: a no-op job, results kept in Redis and awaited with ``Job.result``.

arq's docs name two knobs for throughput: ``max_jobs`` (jobs run at once per worker,
default 10) and ``poll_delay`` (how long the worker sleeps between looks at its queue,
default 0.5 s, which caps an idle-to-busy worker's reaction). Both are set here for short
jobs; everything else is arq's default (results kept, retries on). Results are awaited in
submission order with a short ``poll_delay`` (arq's only way to get a result; one waiter
at a time, since arq runs jobs in queue order). Runs with ``bench/.venvs/arq`` (arq pins
redis-py below 6)::

    python -m bench.peers.arq_app worker|produce|collect --redis-url URL --run R --n N [--rate R]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.jobs import Job
from arq.worker import Worker

from bench.peers.loadgen import Report, cpu_seconds, parse_args, ready

MAX_JOBS = 256
POLL_DELAY_S = 0.01
RESULT_POLL_S = 0.001


async def noop(_ctx: dict[str, Any], t: float) -> float:
    """Does nothing; returns the submission time so the collector can compute the latency."""
    return t


async def paced(n: int, rate: float) -> Any:
    if rate <= 0:
        for i in range(n):
            yield i, 0.0
        return
    begin = time.time()
    for i in range(n):
        due = begin + i / rate
        wait = due - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        yield i, due


async def produce(url: str, run: str, n: int, rate: float, out: str) -> None:
    pool = await create_pool(RedisSettings.from_dsn(url))
    report = Report(first=time.time())
    cpu0 = cpu_seconds()
    async for i, due in paced(n, rate):
        if due:
            report.behind_ms = max(report.behind_ms, (time.time() - due) * 1000)
        await pool.enqueue_job("noop", time.time(), _job_id=f"{run}-{i}")
        report.count = i + 1
    report.last = time.time()
    report.cpu_s = cpu_seconds() - cpu0
    await pool.aclose()
    report.write(out)


async def collect(url: str, run: str, n: int, timeout: float, out: str) -> None:
    pool = await create_pool(RedisSettings.from_dsn(url))
    report = Report()
    ready()
    cpu0 = cpu_seconds()
    deadline = time.monotonic() + timeout
    i = 0
    while i < n and time.monotonic() < deadline:
        job = Job(f"{run}-{i}", pool)
        try:
            value = await job.result(timeout=max(0.01, deadline - time.monotonic()), poll_delay=RESULT_POLL_S)
        except TimeoutError:
            break
        except Exception:  # noqa: BLE001 - arq raises ResultNotFound until the job is enqueued
            await asyncio.sleep(RESULT_POLL_S)
            continue
        report.result(value)
        i += 1
    if report.count < n:
        report.note = f"timed out with {report.count} of {n} results"
    report.cpu_s = cpu_seconds() - cpu0
    await pool.aclose()
    report.write(out)


def worker(url: str) -> None:
    Worker(functions=[noop], redis_settings=RedisSettings.from_dsn(url), max_jobs=MAX_JOBS,
           poll_delay=POLL_DELAY_S, handle_signals=True).run()


def main() -> None:
    args = parse_args()
    if args.mode == "produce":
        asyncio.run(produce(args.redis_url, args.run, args.n, args.rate, args.out))
    elif args.mode == "collect":
        asyncio.run(collect(args.redis_url, args.run, args.n, args.timeout, args.out))
    else:
        worker(args.redis_url)


if __name__ == "__main__":
    main()
