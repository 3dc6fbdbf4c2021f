"""Redis' own work per job, counted in CPU instructions: repeatable where timings are not.

::

    python -m bench.redis_instructions [--jobs 5000] [--tree PATH]

Starts ``redis-server`` under valgrind's callgrind (appendonly on, as in the benchmark),
fills the ingress with ``--jobs`` benchmark jobs through the SDK, then runs a policy worker
until it has routed them all and a pool worker (instant device, ``bench/bench.toml``) until
it has completed them all, in this process. Redis' instruction count is read after each
phase, so the two numbers are what routing and completing one job cost Redis. Counts do
not depend on what else the machine is doing, so two commits can be compared on a busy
machine: ``--tree`` points at another checkout (its ``broker``, ``workers`` and
``bench.toml``). Needs valgrind (Debian package ``valgrind``); Redis runs about 50x slower
under it, so keep ``--jobs`` in the thousands.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _instructions(pid: int, out: Path, tag: str) -> int:
    """Dump callgrind's counters: the instructions since the last dump (a dump zeroes them)."""
    subprocess.run(["callgrind_control", "-d", tag, str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for path in out.glob(f"cg.{pid}.*"):
            text = path.read_text(errors="replace")
            if f"desc: Trigger: dump {tag}\n" in text:
                m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
                if m:
                    path.unlink()
                    return int(m.group(1))
        time.sleep(0.1)
    raise SystemExit(f"error: callgrind wrote no dump for {tag!r} within 30 s")


async def _measure(url: str, jobs: int, tree: Path, pid: int, out: Path) -> tuple[int, int]:
    from bench.broker_load import job
    from broker.client import Client
    from broker.config import load_config
    from broker.connection import connect
    from broker.policy_worker import PolicyWorker
    from broker.settings import Settings
    from workers.factory import make_backend
    from workers.worker import PoolWorker

    config = load_config(tree / "bench" / "bench.toml")
    settings = Settings(redis_url=url, prefix="ri")
    async with Client(url, prefix="ri") as sdk:
        for start in range(0, jobs, 1000):
            await sdk.submit_many([job("ri", "res", i) for i in range(start, min(jobs, start + 1000))])
    client = connect(url)
    try:
        policy = PolicyWorker(client, settings, config)
        await policy.setup()
        _instructions(pid, out, "setup")
        await _run_until(policy.run, lambda: policy.counts.routed >= jobs)
        routing = _instructions(pid, out, "policy")
        spec = config.pools[config.default_pool]
        worker = PoolWorker(client, settings, config.default_pool, make_backend(spec),
                            concurrency=spec.concurrency, lanes=config.lanes)
        await _run_until(worker.run, lambda: worker.outcomes.completed >= jobs)
        return routing, _instructions(pid, out, "worker")
    finally:
        await client.aclose()


async def _run_until(run: Callable[[asyncio.Event], Awaitable[None]], done: Callable[[], bool]) -> None:
    """Run a role until ``done()``, then stop it; a role that fails on the way fails this too."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop))
    while not done():
        if task.done():
            await task  # raises what stopped it
            raise SystemExit("error: the role stopped before it had handled every job")
        await asyncio.sleep(0.05)
    stop.set()
    await task


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.redis_instructions", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=5000, help="jobs routed and completed (default 5,000)")
    p.add_argument("--tree", type=Path, default=ROOT, help="checkout whose broker is measured (default: this one)")
    args = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"error: {tool} not found; install valgrind (Debian: apt install valgrind)")
    sys.path.insert(0, str(args.tree.resolve()))
    import uvloop

    from cli.embedded import find_redis_server, free_port

    with tempfile.TemporaryDirectory(prefix="ib-callgrind-") as tmp:
        out = Path(tmp)
        port = free_port()
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p", find_redis_server(),
             "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--dir", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import redis

            probe = redis.Redis(port=port)
            deadline = time.monotonic() + 60
            while True:
                try:
                    probe.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("error: redis-server did not start under valgrind") from None
                    time.sleep(0.2)
            routing, completing = uvloop.run(_measure(f"redis://127.0.0.1:{port}/0", args.jobs, args.tree.resolve(),
                                                      proc.pid, out))
        finally:
            proc.terminate()
            proc.wait()
    print(f"Redis instructions per job ({args.jobs:,} jobs, {args.tree}):")
    print(f"  routing (policy worker: XREADGROUP + ROUTE)     {routing / args.jobs:>10,.0f}")
    print(f"  completing (pool worker: XREADGROUP + COMPLETE) {completing / args.jobs:>10,.0f}")


if __name__ == "__main__":
    main()
