"""The OpenAI gateway's added latency, and how many streams one gateway process holds.

Latency: a policy worker, a pool worker on the ``instant`` device (bench/bench.toml) and one
``inference-broker gateway`` process, on a private redis-server. Chat jobs with
``max_tokens`` 1 are offered open-loop at ``--rate`` for ``--seconds``, once through the SDK
(``Client.run`` in this process) and once through the gateway (``POST /v1/chat/completions``
with an API key, aiohttp), the two alternating for ``--repeats`` rounds after a warm-up of
each. Latency is from the request's send to its whole answer; the gateway's added latency
is the difference of the two at each percentile. The instant device answers at once, so
what remains is the broker's path with and without the HTTP hop.

Streams: the same roles and gateway on bench/gateway_streams.toml (simulated H100s with
room for every stream). At each level N (doubling up to ``--max-streams``) N streaming chat
requests are opened at once and read to their end. A level holds when every stream ends
with ``[DONE]`` and all its tokens, and the p99 of the gateway's relay lag (the later of:
first token at the client minus the worker's first token, end at the client minus the
worker's finish, both read from the job's result) is within ``--lag-bound-ms``. The ramp
stops at the first level that does not hold, or after ``--budget-s``.

    python -m bench.gateway                      # about 1 min; appends nothing
    python -m bench.gateway --out bench/RESULTS.md   # appends the "Gateway" section
    python -m bench.gateway --quick              # smoke run, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import psutil
import uvloop

from bench.gateway_report import report
from bench.gateway_stack import KEY, GatewayStack
from bench.harness import ROOT, Procs, percentile
from bench.systems import CONFIG
from bench.throughput import machine
from broker.client import Client
from broker.wire import ChatMessage, Job, new_id
from cli.embedded import EmbeddedRedis

STREAM_CONFIG = ROOT / "bench" / "gateway_streams.toml"
STREAM_MODEL = "llama-3.1-8b"
CHAT = [{"role": "user", "content": "Hello"}]


@dataclass
class Offered:
    """One open-loop run of one path."""

    latencies_ms: list[float]
    errors: int
    behind_ms: float
    """How late the latest send left against its schedule (this process falling behind)."""


async def offer(call: Callable[[], Awaitable[bool]], rate: float, seconds: float) -> Offered:
    """Send ``rate`` requests per second for ``seconds``, each on its own task, at fixed instants."""
    latencies: list[float] = []
    errors = 0
    behind = 0.0

    async def one() -> None:
        nonlocal errors
        sent = time.perf_counter()
        try:
            ok = await asyncio.wait_for(call(), timeout=30)
        except Exception:  # any failure is an error of this request: counted, never fatal to the run
            ok = False
        if ok:
            latencies.append((time.perf_counter() - sent) * 1000)
        else:
            errors += 1

    start, tasks = time.perf_counter(), []
    for i in range(int(rate * seconds)):
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        behind = max(behind, time.perf_counter() - due)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return Offered(latencies, errors, behind * 1000)


@dataclass
class Level:
    """One level of the streaming ramp."""

    streams: int
    complete: int
    lag_ms: list[float]
    ttft_ms: list[float]
    """Client send to the first token: the device's TTFT at this load plus the broker and gateway."""
    seconds: float
    gateway_cpu_s: float
    gateway_rss_mb: float
    errors: list[str]

    def holds(self, bound_ms: float) -> bool:
        return self.complete == self.streams and percentile(self.lag_ms, 99) <= bound_ms


async def stream_one(session: aiohttp.ClientSession, url: str, max_tokens: int) -> tuple[str, float, float, float, int]:
    """One streaming chat: (job id, sent, first token, end) as epoch seconds and the tokens counted."""
    body = {"model": STREAM_MODEL, "messages": CHAT, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, first, tokens = time.time(), 0.0, 0
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=_auth()) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        job_id = resp.headers["x-ib-job-id"]
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                return job_id, sent, first, time.time(), tokens
            event = msgspec.json.decode(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif not first and any(c["delta"].get("content") for c in event.get("choices", [])):
                first = time.time()
    raise RuntimeError("the stream ended without [DONE]")


async def ramp_level(stack: GatewayStack, n: int, max_tokens: int, timeout: float) -> Level:
    gateway = psutil.Process(stack.gateway.pid)
    cpu0, started = sum(gateway.cpu_times()[:2]), time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        got = await asyncio.gather(*(stream_one(session, stack.gateway_url, max_tokens) for _ in range(n)),
                                   return_exceptions=True)
        rss = gateway.memory_info().rss / 2**20
    seconds, cpu = time.monotonic() - started, sum(gateway.cpu_times()[:2]) - cpu0
    errors = sorted({f"{type(g).__name__}: {g}"[:160] for g in got if isinstance(g, BaseException)})
    done = [g for g in got if not isinstance(g, BaseException)]
    results = await stack.results([g[0] for g in done])
    lags, ttfts, complete = [], [], 0
    for job_id, sent, first, end, tokens in done:
        timing = results[job_id].timing if job_id in results else None
        if timing is None or tokens != max_tokens or not first:
            errors.append(f"{job_id}: {tokens} of {max_tokens} tokens, result {'found' if timing else 'missing'}")
            continue
        complete += 1
        lags.append(max(first - timing.first_token_at, end - timing.finished_at) * 1000)
        ttfts.append((first - sent) * 1000)
    return Level(n, complete, lags, ttfts, seconds, cpu, rss, errors[:5])


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


async def latency(stack: GatewayStack, rate: float, seconds: float, repeats: int, warmup_s: float
                  ) -> tuple[dict[str, Offered], float]:
    """Both paths at ``rate``: their runs merged, and the gateway's CPU ms per request."""
    gateway = psutil.Process(stack.gateway.pid)
    chat_body = {"model": "noop", "messages": CHAT, "max_tokens": 1}
    async with Client(stack.url, prefix=stack.prefix) as client, aiohttp.ClientSession() as session:
        async def via_sdk() -> bool:
            job = Job(id=new_id(), model="noop", tenant="bench", max_tokens=1,
                      messages=[ChatMessage(role="user", content="Hello")])
            return (await client.run(job, timeout=30)).status == "ok"

        async def via_gateway() -> bool:
            async with session.post(f"{stack.gateway_url}/v1/chat/completions", json=chat_body,
                                    headers=_auth()) as resp:
                await resp.read()
                return resp.status == 200

        paths = {"sdk": via_sdk, "gateway": via_gateway}
        for call in paths.values():
            await offer(call, rate, warmup_s)
        merged = {name: Offered([], 0, 0.0) for name in paths}
        gateway_cpu, gateway_requests = 0.0, 0
        for round_ in range(repeats):
            for name in sorted(paths, reverse=round_ % 2 == 1):  # alternate which goes first
                cpu0 = sum(gateway.cpu_times()[:2])
                run = await offer(paths[name], rate, seconds)
                if name == "gateway":
                    gateway_cpu += sum(gateway.cpu_times()[:2]) - cpu0
                    gateway_requests += len(run.latencies_ms) + run.errors
                merged[name].latencies_ms += run.latencies_ms
                merged[name].errors += run.errors
                merged[name].behind_ms = max(merged[name].behind_ms, run.behind_ms)
    return merged, gateway_cpu / max(1, gateway_requests) * 1000


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s at 50/s, streams 5 and 10; seconds")
    p.add_argument("--rate", type=float, default=200.0, help="offered requests/s per path (default 200)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each path's run (default 10)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of both paths (default 2)")
    p.add_argument("--streams-from", type=int, default=50, help="first level of the streaming ramp (default 50)")
    p.add_argument("--max-streams", type=int, default=3200, help="last level of the ramp at most (default 3200)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default 64)")
    p.add_argument("--lag-bound-ms", type=float, default=500.0,
                   help="p99 relay lag a level may have and still hold (default 500)")
    p.add_argument("--budget-s", type=float, default=180.0, help="time the ramp may take in all (default 180)")
    p.add_argument("--out", type=Path, help="append the Gateway section to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.rate, args.seconds, args.repeats = 50.0, 1.0, 1
        args.streams_from, args.max_streams, args.budget_s = 5, 10, 60.0
    return args


async def run(args: argparse.Namespace, redis: EmbeddedRedis, procs: Procs) -> str:
    box = machine()  # before the load: its load average is the machine's own
    prefix = f"gw{uuid.uuid4().hex[:8]}"
    with GatewayStack(procs, redis.url, prefix, CONFIG, "bench") as stack:
        lat, cpu_ms = await latency(stack, args.rate, args.seconds, args.repeats, 0.5 if args.quick else 2.0)
    levels: list[Level] = []
    deadline = time.monotonic() + args.budget_s
    with GatewayStack(procs, redis.url, prefix + "s", STREAM_CONFIG, "stream") as stack:
        n = args.streams_from
        while n <= args.max_streams and time.monotonic() < deadline:
            left = deadline - time.monotonic()
            levels.append(await ramp_level(stack, n, args.max_tokens, timeout=max(5.0, left)))
            print(f"streams {n}: {levels[-1].complete} complete, "
                  f"p99 lag {percentile(levels[-1].lag_ms, 99):.0f} ms", file=sys.stderr)
            if not levels[-1].holds(args.lag_bound_ms):
                break
            n *= 2
    return report(args, box, lat, cpu_ms, levels)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    procs = Procs(Path(tempfile.mkdtemp(prefix="ib-bench-gateway-")))
    try:
        with EmbeddedRedis() as redis:
            text = uvloop.run(run(args, redis, procs))
    finally:
        procs.stop_all()
    text = text.replace("{elapsed}", f"{time.monotonic() - started:.0f}")
    print(text)
    if args.out:
        with args.out.open("a", encoding="utf-8") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
