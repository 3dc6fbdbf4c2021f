"""Memory over a long run: each role's resident memory, and Redis' ``used_memory`` back at baseline.

Run by ``python -m bench.throughput --memory [--memory-jobs N] [--no-main]``. One policy
worker and one pool worker (instant device) take ``N`` jobs, submitted as fast as the
ingress backlog allows (the SDK's ``Backpressure`` makes the producer wait) and read
through a result-stream group. A sampler thread records, twice a second, the resident
memory of each role and Redis' ``used_memory``. Per-job state that never expires would
show as resident memory rising with the jobs done; stream entries or keys that are never
removed as ``used_memory`` staying up after the drain.

Retention is shortened so that "after the drain" comes within the run: results and dedup
keys live 10 s (``IB_RESULT_TTL_S``, ``IB_RESULTS_RETENTION_S``) and the janitor trims
every second; defaults are an hour. Baseline: the server after a warm-up batch has drained
and expired, so the roles' imports, connections and caches are already there.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from rich.console import Console

from bench.harness import Procs, Role, measure
from bench.systems import InferenceBroker
from cli.embedded import EmbeddedRedis

RETENTION = {"IB_RESULT_TTL_S": "10", "IB_RESULTS_RETENTION_S": "10", "IB_JANITOR_S": "1"}
MB = 2**20


@dataclass
class Samples:
    times: list[float] = field(default_factory=list)
    rss: dict[str, list[int]] = field(default_factory=dict)
    used: list[int] = field(default_factory=list)


def used_memory(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("memory")  # type: ignore[assignment] # sync client: a dict, not Awaitable
    return int(info["used_memory"])


def settle(client: redis.Redis, timeout: float) -> int:
    """Wait until results and dedup keys have expired (``used_memory`` stops falling); return it.

    At least the retention plus two janitor periods first: until then memory is flat only
    because nothing is old enough to remove yet.
    """
    time.sleep(float(RETENTION["IB_RESULTS_RETENTION_S"]) + 2 * float(RETENTION["IB_JANITOR_S"]))
    deadline = time.monotonic() + timeout
    last = used_memory(client)
    quiet = 0
    while time.monotonic() < deadline and quiet < 6:
        time.sleep(0.5)
        now = used_memory(client)
        quiet = quiet + 1 if abs(now - last) < 64 * 1024 else 0
        last = now
    return last


def memory_section(server: EmbeddedRedis, procs: Procs, n: int, console: Console) -> str:
    client = redis.Redis.from_url(server.url)
    system = InferenceBroker(settings=RETENTION)
    run = "mem"
    console.print(f"[bold]memory[/bold]: {n:,} jobs through one policy and one pool worker")
    roles = system.start(procs, server.url, run)
    samples = Samples()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.times.append(time.time())
            for role in roles:
                samples.rss.setdefault(role.label, []).append(role.rss())
            samples.used.append(used_memory(client))
            stop.wait(0.5)

    try:
        system.wait_ready(server.url, run, 1, 1)
        all_roles: list[Role] = roles
        measure(procs, all_roles, system.client(), system.client_args(server.url, run, "warm"), n=5000, rate=0,
                timeout=120, tag="memory-warm")
        baseline = settle(client, 40)
        rss0 = {r.label: r.rss() for r in roles}
        console.print(f"  baseline: used_memory {baseline / MB:.2f} MB; "
                      + ", ".join(f"{k} RSS {v / MB:.1f} MB" for k, v in rss0.items()))
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        started = time.time()
        m = measure(procs, all_roles, system.client(), system.client_args(server.url, run, "mem"), n=n, rate=0,
                    timeout=n / 200 + 120, tag="memory")
        drained = time.time()
        after = settle(client, 60)
        stop.set()
        thread.join()
        rss1 = {r.label: r.rss() for r in roles}
    finally:
        stop.set()
        system.stop(procs)
        client.flushall()
    peak = max(samples.used, default=baseline)
    console.print(f"  {n:,} jobs at {m.jobs_per_s:,.0f} jobs/s; used_memory peak {peak / MB:.1f} MB, after the "
                  f"drain {after / MB:.2f} MB (baseline {baseline / MB:.2f} MB)")
    rows = []
    for label, series in samples.rss.items():
        # The second half of the run against the first: growth per job that survives the drain.
        half = len(series) // 2
        first = max(series[:half], default=0)
        second = max(series[half:], default=0)
        rows.append(f"| {label} | {rss0[label] / MB:.1f} | {max(series, default=0) / MB:.1f} | "
                    f"{first / MB:.1f} / {second / MB:.1f} | {rss1[label] / MB:.1f} |")
    return (
        f"## Memory\n\n{n:,} jobs through one policy worker and one pool worker (instant device), submitted as "
        f"fast as the ingress backlog allowed, at {m.jobs_per_s:,.0f} jobs/s ({drained - started:.0f} s). "
        "Retention shortened to 10 s so that the drain completes within the run (see `bench/memory.py`).\n\n"
        "| role | RSS after warm-up (MB) | peak (MB) | peak 1st half / 2nd half (MB) | after the drain (MB) |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "| Redis | MB |\n|---|---:|\n"
        f"| used_memory at baseline (after warm-up, drained) | {baseline / MB:.2f} |\n"
        f"| peak during the run | {peak / MB:.2f} |\n"
        f"| after the drain (results and keys expired) | {after / MB:.2f} |\n"
        f"| difference to baseline | {(after - baseline) / MB:+.2f} |\n"
    )
