"""uvicorn (uvloop + httptools) against granian, serving the same tiny Starlette app.

Two endpoints: ``/json`` answers a small JSON body (a chat completion's size), ``/sse``
streams 20 server-sent events (a short token stream). Each server runs as one process on
loopback; an aiohttp client holds ``--concurrency`` requests open for ``--seconds`` and
reports requests per second, latency percentiles (for /sse: the whole stream) and the
server's CPU time per request (its process tree). This measures the HTTP stack alone:
which server to put the gateway on (bench/GATEWAY.md). ``--gateway`` also measures the
real gateway the same way (``inference-broker up``: embedded Redis, roles, the gateway on
uvicorn; chat requests of one output token), to set the server's share of a request's cost.

    python -m bench.gateway_servers --seconds 3 --concurrency 32 [--gateway]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator

import psutil
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

BODY = {"id": "chatcmpl-0", "object": "chat.completion", "model": "llama-3.1-8b",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok " * 32}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 32, "total_tokens": 40}}
EVENTS = 20


async def small_json(request: Request) -> Response:
    return JSONResponse(BODY)


async def sse(request: Request) -> Response:
    async def events() -> AsyncIterator[bytes]:
        for i in range(EVENTS):
            yield b'data: {"choices":[{"delta":{"content":"tok "},"index":%d}]}\n\n' % i
            await asyncio.sleep(0)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(routes=[Route("/json", small_json), Route("/sse", sse)])

SERVERS = {
    "uvicorn": ["-m", "uvicorn", "bench.gateway_servers:app", "--loop", "uvloop", "--http", "httptools",
                "--no-access-log", "--log-level", "warning", "--port"],
    "granian": ["-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--workers", "1", "--no-access-log",
                "--log-level", "warning", "bench.gateway_servers:app", "--port"],
}


async def _wait_up(port: int, path: str = "/json", tries: int = 200) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(tries):
            try:
                async with session.get(f"http://127.0.0.1:{port}{path}") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"no server on port {port}")


CHAT = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of ``proc`` and its children (granian serves from worker processes)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def load(port: int, path: str, seconds: float, concurrency: int,
               server: psutil.Process | None = None) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    stop = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    cpu0 = cpu_s(server) if server else 0.0
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one_client() -> None:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                if path == "/v1/chat/completions":
                    request = session.post(f"http://127.0.0.1:{port}{path}", json=CHAT)
                else:
                    request = session.get(f"http://127.0.0.1:{port}{path}")
                async with request as r:
                    await r.read()
                    assert r.status == 200, r.status
                latencies.append(time.perf_counter() - t0)

        t0 = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    cpu = (cpu_s(server) - cpu0) if server else 0.0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {"rps": len(latencies) / elapsed, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
            "cpu_us": cpu / len(latencies) * 1e6}


def row(name: str, path: str, r: dict[str, float]) -> str:
    return (f"| {name} | {path} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['cpu_us']:,.0f} |")


def measure_gateway(args: argparse.Namespace) -> None:
    """The real gateway under `up` (no keys, on 127.0.0.1): chat requests of one token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IB_") and k != "REDIS_URL"}
    with tempfile.TemporaryDirectory() as state:
        env["XDG_RUNTIME_DIR"] = state
        up = subprocess.Popen([sys.executable, "-m", "cli", "up", "--gateway-port", str(args.port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(_wait_up(args.port, "/readyz", tries=1200))
            gateway = next(p for p in psutil.Process(up.pid).children()
                           if "gateway" in p.cmdline() and "hash-key" not in p.cmdline())
            r = asyncio.run(load(args.port, "/v1/chat/completions", args.seconds, args.concurrency, gateway))
            print(row("gateway (uvicorn) + roles", "/v1/chat/completions", r), flush=True)
        finally:
            up.terminate()
            up.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument("--gateway", action="store_true", help="also measure the real gateway under `up`")
    args = parser.parse_args()
    print(f"# {platform.node()} python {platform.python_version()}, {args.seconds:g} s per run, "
          f"concurrency {args.concurrency}, load average {os.getloadavg()[0]:.1f}")
    print("| server | endpoint | req/s | p50 ms | p99 ms | server CPU µs/req |\n|---|---|---:|---:|---:|---:|")
    for name, argv in SERVERS.items():
        proc = subprocess.Popen([sys.executable, *argv, str(args.port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            asyncio.run(_wait_up(args.port))
            for path in ("/json", "/sse"):
                r = asyncio.run(load(args.port, path, args.seconds, args.concurrency, psutil.Process(proc.pid)))
                print(row(name, path, r), flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if args.gateway:
        measure_gateway(args)


if __name__ == "__main__":
    main()
