"""Taskiq peer: a no-op task on taskiq-redis's stream broker, results in its Redis backend.

``RedisStreamBroker`` is taskiq-redis's broker with consumer groups and acks (the reliable
one; the list and pub/sub brokers lose work on a crash). Settings are taskiq's defaults,
which its docs present as the production setup: ``taskiq worker`` with two worker
processes, 100 concurrent tasks each, the broker reading 100 entries per XREADGROUP.
Results are awaited in submission order with ``wait_result`` and a short check interval.
Runs with ``bench/.venvs/taskiq`` (taskiq-redis 1.2 needs redis-py 8)::

    BENCH_REDIS_URL=URL python -m taskiq worker bench.peers.taskiq_app:broker --workers 2
    python -m bench.peers.taskiq_app produce|collect --redis-url URL --run R --n N [--rate R]
"""

from __future__ import annotations

import asyncio
import os
import time

from taskiq import AsyncTaskiqTask
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from bench.peers.loadgen import Report, cpu_seconds, parse_args, ready

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RESULT_CHECK_S = 0.001
result_backend: RedisAsyncResultBackend[float] = RedisAsyncResultBackend(URL, result_ex_time=3600)
broker = RedisStreamBroker(URL).with_result_backend(result_backend)
WORKER_ARGS = ["--log-level", "WARNING"]


@broker.task(task_name="noop")
async def noop(t: float) -> float:
    """Does nothing; returns the submission time so the collector can compute the latency."""
    return t


async def produce(run: str, n: int, rate: float, out: str) -> None:
    await broker.startup()
    report = Report(first=time.time())
    cpu0 = cpu_seconds()
    begin = time.time()
    for i in range(n):
        if rate > 0:
            due = begin + i / rate
            wait = due - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            report.behind_ms = max(report.behind_ms, (time.time() - due) * 1000)
        await noop.kicker().with_task_id(f"{run}-{i}").kiq(time.time())
        report.count = i + 1
    report.last = time.time()
    report.cpu_s = cpu_seconds() - cpu0
    await broker.shutdown()
    report.write(out)


async def collect(run: str, n: int, timeout: float, out: str) -> None:
    await broker.startup()
    report = Report()
    ready()
    cpu0 = cpu_seconds()
    deadline = time.monotonic() + timeout
    for i in range(n):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        task: AsyncTaskiqTask[float] = AsyncTaskiqTask(f"{run}-{i}", result_backend)
        try:
            result = await task.wait_result(check_interval=RESULT_CHECK_S, timeout=left)
        except Exception:  # noqa: BLE001 - TaskiqResultTimeoutError
            break
        report.result(None if result.is_err else result.return_value)
    if report.count < n:
        report.note = f"timed out with {report.count} of {n} results"
    report.cpu_s = cpu_seconds() - cpu0
    await broker.shutdown()
    report.write(out)


def main() -> None:
    args = parse_args()
    if args.mode == "produce":
        asyncio.run(produce(args.run, args.n, args.rate, args.out))
    elif args.mode == "collect":
        asyncio.run(collect(args.run, args.n, args.timeout, args.out))
    else:
        import sys

        from taskiq.__main__ import main as taskiq_main

        sys.argv = ["taskiq", "worker", "bench.peers.taskiq_app:broker", "--workers", str(args.processes),
                    *WORKER_ARGS]
        taskiq_main()


if __name__ == "__main__":
    main()
