"""Celery peer: a no-op task over the Redis broker, results in the Redis result backend.

Settings follow Celery's own advice for many short tasks ("Optimizing" guide and worker
docs): the prefork pool with one process per core, a high prefetch multiplier so a worker
is not starved between round trips, rate limits off, and gossip/mingle/heartbeat off (they
are cluster chatter, not task work). Results are gathered with ``ResultSet.join_native``,
which the docs name as the fast path for the Redis backend (one pub/sub listener instead
of a poll per task). Runs with the interpreter of ``bench/.venvs/celery`` or any
environment that has ``bench/peers/requirements-celery.txt``::

    BENCH_REDIS_URL=URL celery -A bench.peers.celery_app worker --pool prefork --concurrency 2 ...
    python -m bench.peers.celery_app produce|collect --redis-url URL --run R --n N [--rate R]
"""

from __future__ import annotations

import os
import sys
import time

from celery import Celery
from celery.result import AsyncResult, ResultSet

from bench.peers.loadgen import Report, cpu_seconds, parse_args, ready, schedule

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench", broker=URL, backend=URL)
app.conf.update(
    worker_prefetch_multiplier=64,
    worker_disable_rate_limits=True,
    broker_connection_retry_on_startup=True,
    task_acks_late=False,
    result_extended=False,
    worker_hijack_root_logger=False,
)
WORKER_ARGS = ["--pool", "prefork", "--without-gossip", "--without-mingle", "--without-heartbeat",
               "--loglevel", "WARNING"]
"""Worker flags besides ``--concurrency`` (the harness adds that)."""


@app.task(name="noop")
def noop(t: float) -> float:
    """Does nothing; returns the submission time so the collector can compute the latency."""
    return t


def produce(run: str, n: int, rate: float, chunk: int, out: str) -> None:
    report = Report(first=time.time())
    cpu0 = cpu_seconds()
    for start, stop, due in schedule(n, rate, chunk):
        if due:
            report.behind_ms = max(report.behind_ms, (time.time() - due) * 1000)
        for i in range(start, stop):
            noop.apply_async((time.time(),), task_id=f"{run}-{i}")
        report.count = stop
    report.last = time.time()
    report.cpu_s = cpu_seconds() - cpu0
    report.write(out)


def collect(run: str, n: int, timeout: float, out: str) -> None:
    report = Report()
    results = ResultSet([AsyncResult(f"{run}-{i}", app=app) for i in range(n)])
    ready()
    cpu0 = cpu_seconds()

    def seen(_task_id: str, value: object) -> None:
        report.result(value if isinstance(value, float) else None)

    try:
        results.join_native(timeout=timeout, propagate=False, callback=seen)
    except TimeoutError:
        report.note = f"timed out with {report.count} of {n} results"
    report.cpu_s = cpu_seconds() - cpu0
    report.write(out)


def main() -> None:
    args = parse_args()
    if args.mode == "produce":
        produce(args.run, args.n, args.rate, args.chunk, args.out)
    elif args.mode == "collect":
        collect(args.run, args.n, args.timeout, args.out)
    else:
        app.worker_main(["worker", "--concurrency", str(args.processes), *WORKER_ARGS])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
