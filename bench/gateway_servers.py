"""uvicorn (uvloop + httptools) against granian, serving the same tiny Starlette app.

Two endpoints: ``/json`` answers a small JSON body (a chat completion's size), ``/sse``
streams 20 server-sent events (a short token stream). Each server runs as one process on
loopback; an aiohttp client holds ``--concurrency`` requests open for ``--seconds`` and
reports requests per second and latency percentiles (for /sse: the whole stream). This
measures the HTTP stack alone, not the broker behind it: which server to put the
gateway on (bench/GATEWAY.md).

    python -m bench.gateway_servers --seconds 3 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator

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


async def _wait_up(port: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(f"http://127.0.0.1:{port}/json") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"no server on port {port}")


async def load(port: int, path: str, seconds: float, concurrency: int) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    stop = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one_client() -> None:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                async with session.get(f"http://127.0.0.1:{port}{path}") as r:
                    await r.read()
                latencies.append(time.perf_counter() - t0)

        t0 = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {"rps": len(latencies) / elapsed, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--port", type=int, default=18931)
    args = parser.parse_args()
    print(f"# {platform.node()} python {platform.python_version()}, {args.seconds:g} s per run, "
          f"concurrency {args.concurrency}")
    print("| server | endpoint | req/s | p50 ms | p99 ms |\n|---|---|---:|---:|---:|")
    for name, argv in SERVERS.items():
        proc = subprocess.Popen([sys.executable, *argv, str(args.port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            asyncio.run(_wait_up(args.port))
            for path in ("/json", "/sse"):
                r = asyncio.run(load(args.port, path, args.seconds, args.concurrency))
                print(f"| {name} | {path} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
