"""What ``submit_replicas`` costs a producer: submit latency and rate with and without WAIT.

``python -m bench.durability`` starts a local Redis Cluster of three primaries with one
replica each (loopback, cli/cluster.py) and submits jobs through the SDK to a deployment
of three shards, one job per call and 100 per call, first returning at the primary's word
(``submit_replicas = 0``), then waiting for one replica of each shard (``= 1``). Nothing
consumes the jobs: this is the producer's side only. Prints a table at 80 columns.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
import uuid

from broker.client import Client
from broker.wire import Job
from cli.cluster import EmbeddedCluster

SHARDS = 3


async def measure(url: str, replicas: int, per_call: int, jobs: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms of one submit call, jobs/s) for ``jobs`` jobs, ``per_call`` a call."""
    prefix = f"d{uuid.uuid4().hex[:8]}"
    made = [Job(id=f"{prefix}-{i}", model="llama-3.1-8b", kind="completion", prompt="p" * 200, max_tokens=16)
            for i in range(jobs)]
    took: list[float] = []
    async with Client(url, prefix=prefix, shards=SHARDS, replicas=replicas, replicas_ms=1000) as sdk:
        await sdk.submit_many(made[:per_call])  # connections opened, slots learned
        start = time.perf_counter()
        for i in range(per_call, jobs, per_call):
            t0 = time.perf_counter()
            await sdk.submit_many(made[i:i + per_call], chunk=per_call)
            took.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    quantiles = statistics.quantiles(took, n=100)
    return quantiles[49] * 1000, quantiles[98] * 1000, (jobs - per_call) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.durability", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per one-a-call run (x10 for 100 a call)")
    args = parser.parse_args()
    print(f"{platform.node()}, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}; 3 primaries + 3 replicas on loopback, {SHARDS} shards", file=sys.stderr)
    with EmbeddedCluster(primaries=3, replicas=1) as cluster:
        host, port = cluster.startup_nodes[0]
        url = f"redis+cluster://{host}:{port}"
        print(f"{'jobs/call':>9} {'replicas':>8} {'p50 ms':>8} {'p99 ms':>8} {'jobs/s':>9}")
        for per_call, jobs in ((1, args.jobs), (100, args.jobs * 10)):
            for replicas in (0, 1):
                p50, p99, rate = asyncio.run(measure(url, replicas, per_call, jobs))
                print(f"{per_call:>9} {replicas:>8} {p50:>8.2f} {p99:>8.2f} {rate:>9,.0f}")


if __name__ == "__main__":
    main()
