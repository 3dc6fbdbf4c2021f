"""The load-generation side every system shares: pacing, latency records, the report file.

Standard library only: the peers' client processes import this from their own virtual
environments (arq, Celery and taskiq-redis pin redis-py versions that cannot share one
environment with the broker), so nothing here may import redis, msgspec or the broker.

Every system's client runs as two processes, a *producer* and a *collector*, started by
``bench.throughput``:

* The producer submits ``n`` jobs, each carrying the wall-clock time it was submitted, either
  as fast as it can (``rate`` 0: saturation) or open-loop on a fixed schedule (job ``i`` is
  due at ``start + i / rate``, whatever happened to earlier ones, so a slow system cannot
  slow the offered load down and hide its own latency: no coordinated omission).
* The collector receives the ``n`` results and records, per job, the time it saw the result
  minus the submission time carried in it: the latency the system added end to end, since
  the task itself does nothing. Both processes are on one host, so their clocks agree.

Each writes a JSON report (:class:`Report`) that the harness reads back.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field


@dataclass
class Report:
    """What one producer or collector process reports about its part of a measurement."""

    count: int = 0
    """Jobs submitted (producer) or results received (collector)."""
    first: float = 0.0
    """Wall time of the first submission / first result."""
    last: float = 0.0
    """Wall time of the last submission / last result."""
    cpu_s: float = 0.0
    """CPU seconds (user + system) this process spent between the start of its loop and its end."""
    latencies_ms: list[float] = field(default_factory=list)
    """Collector only: per-job added latency in milliseconds, in arrival order."""
    behind_ms: float = 0.0
    """Producer only: how far behind its schedule it fell at worst (0 when unpaced)."""
    errors: int = 0
    """Results that reported a failure (collector) or refused submissions (producer)."""
    note: str = ""

    def result(self, submitted_at: float | None) -> None:
        """Count one result seen now: its latency from ``submitted_at``, or ``None`` for a failure."""
        now = time.time()
        if submitted_at is None:
            self.errors += 1
        else:
            self.latencies_ms.append((now - submitted_at) * 1000)
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as out:
            json.dump(asdict(self), out)
        os.replace(tmp, path)  # the harness never reads half a report

    @classmethod
    def read(cls, path: str) -> Report:
        with open(path) as src:
            return cls(**json.load(src))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def schedule(n: int, rate: float, chunk: int) -> Iterator[tuple[int, int, float]]:
    """Slices ``(start, stop, due)`` of job indexes to submit, and the wall time they are due.

    Unpaced (``rate`` 0), slices of ``chunk`` jobs with no due time (0). Paced, each slice
    holds the jobs whose due times have passed by the moment the producer looks again, so a
    producer that keeps up submits one job at a time and one that falls behind catches up
    in larger pipelined slices instead of falling further behind.
    """
    begin, i = time.time(), 0
    while i < n:
        step = next_slice(i, n, rate, chunk, begin, time.time())
        if isinstance(step, float):
            time.sleep(step)
            continue
        yield step
        i = step[1]


def next_slice(i: int, n: int, rate: float, chunk: int, begin: float,
               now: float) -> tuple[int, int, float] | float:
    """The slice of :func:`schedule` that starts at job ``i`` at ``now``, or the seconds until it is due."""
    if rate <= 0:
        return i, min(n, i + chunk), 0.0
    due_count = min(n, int((now - begin) * rate) + 1)
    if due_count <= i:
        return max(0.0, begin + i / rate - now)
    return i, min(due_count, i + chunk), begin + i / rate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments every producer/collector entry point takes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["produce", "collect", "worker"])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--n", type=int, default=1000, help="jobs to submit / results to wait for")
    parser.add_argument("--rate", type=float, default=0.0, help="jobs/s, open loop; 0 = as fast as possible")
    parser.add_argument("--run", default="r0", help="a tag making job ids and keys unique to this run")
    parser.add_argument("--out", default="", help="where to write the JSON report")
    parser.add_argument("--timeout", type=float, default=120.0, help="collector: give up after this many seconds")
    parser.add_argument("--chunk", type=int, default=256, help="producer: most jobs per pipelined submission")
    parser.add_argument("--processes", type=int, default=1, help="worker: processes (where the peer has them)")
    parser.add_argument("--reply", default="results", help="broker: result stream name of this run's jobs")
    parser.add_argument("--via", default="group", choices=["group", "wait"],
                        help="broker collector: follow the result stream through a group, or wait per job id")
    parser.add_argument("--shards", type=int, default=1, help="broker: shards of the deployment (bench.shards)")
    return parser.parse_args(argv)


def ready() -> None:
    """Tell the harness (reading stdout) that set-up is done and timing may start."""
    print("ready", flush=True)


def fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)
