"""The raw ceiling: three pipelined redis-py hops in separate processes, no broker features.

ingress --(hop "policy")--> pool --(hop "worker")--> results, each hop reading with
``XREADGROUP COUNT 256`` and writing the batch with XADDs plus one XACK in one pipeline
(hiredis parsing, msgspec msgpack bodies). No retries, leases, fencing, dedup, deletion
or validation: the least work that moves a job through three streams, for the broker's
numbers to be read against. ::

    python -m bench.raw_chain hop --redis-url URL --run R --src ingress --dst pool
    python -m bench.raw_chain produce|collect --redis-url URL --run R --n N [--rate R]
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import msgspec
import redis
from redis.utils import HIREDIS_AVAILABLE

from bench.peers.loadgen import Report, cpu_seconds, fail, parse_args, ready, schedule

GROUP = "g"
COUNT = 256
_encode = msgspec.msgpack.Encoder().encode


class Body(msgspec.Struct, array_like=True):
    """A job: its index and the wall time it was submitted."""

    i: int
    t: float


_decode = msgspec.msgpack.Decoder(Body).decode


def key(run: str, name: str) -> str:
    return f"raw:{run}:{name}"


def connect(url: str) -> redis.Redis:
    if not HIREDIS_AVAILABLE:
        print("warning: hiredis is not installed; the raw chain is about 2x slower without it", file=sys.stderr)
    return redis.Redis.from_url(url)


def hop(url: str, src: str, dst: str) -> None:
    """Move entries from ``src`` to ``dst`` until killed: decode, re-encode, XADD + XACK."""
    client = connect(url)
    try:
        client.xgroup_create(src, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    consumer = f"c{os.getpid()}"
    ready()
    while True:
        reply: Any = client.xreadgroup(GROUP, consumer, {src: ">"}, count=COUNT, block=1000)
        if not reply:
            continue
        entries = reply[0][1]
        pipe = client.pipeline(transaction=False)
        for _id, fields in entries:
            body = _decode(fields[b"b"])  # a hop looks at what it moves, as the broker's roles do
            pipe.xadd(dst, {"b": _encode(body)})
        pipe.xack(src, GROUP, *[entry_id for entry_id, _ in entries])
        pipe.execute()


def produce(url: str, run: str, n: int, rate: float, chunk: int, out: str) -> None:
    client = connect(url)
    stream = key(run, "ingress")
    report = Report(first=time.time())
    cpu0 = cpu_seconds()
    for start, stop, due in schedule(n, rate, chunk):
        now = time.time()
        if due:
            report.behind_ms = max(report.behind_ms, (now - due) * 1000)
        pipe = client.pipeline(transaction=False)
        for i in range(start, stop):
            pipe.xadd(stream, {"b": _encode(Body(i, time.time()))})
        pipe.execute()
        report.count = stop
    report.last = time.time()
    report.cpu_s = cpu_seconds() - cpu0
    report.write(out)


def collect(url: str, run: str, n: int, timeout: float, out: str) -> None:
    client = connect(url)
    stream = key(run, "results")
    report = Report()
    # Start after what earlier measurements left on the stream: only this run's jobs count.
    newest: Any = client.xrevrange(stream, count=1)
    last: bytes | str = newest[0][0] if newest else "0-0"
    ready()
    cpu0 = cpu_seconds()
    deadline = time.monotonic() + timeout
    while report.count < n and time.monotonic() < deadline:
        reply: Any = client.xread({stream: last}, count=1024, block=1000)
        if not reply:
            continue
        now = time.time()
        for entry_id, fields in reply[0][1]:
            body = _decode(fields[b"b"])
            report.latencies_ms.append((now - body.t) * 1000)
            last = entry_id
        if not report.count:
            report.first = now
        report.count += len(reply[0][1])
        report.last = now
    report.cpu_s = cpu_seconds() - cpu0
    if report.count < n:
        report.note = f"timed out with {report.count} of {n} results"
    report.write(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "hop":
        if len(argv) != 9:
            fail("usage: python -m bench.raw_chain hop --redis-url URL --run R --src NAME --dst NAME")
        opts = dict(zip(argv[1::2], argv[2::2], strict=True))
        hop(opts["--redis-url"], key(opts["--run"], opts["--src"]), key(opts["--run"], opts["--dst"]))
        return
    args = parse_args(argv)
    if args.mode == "produce":
        produce(args.redis_url, args.run, args.n, args.rate, args.chunk, args.out)
    elif args.mode == "collect":
        collect(args.redis_url, args.run, args.n, args.timeout, args.out)
    else:
        fail("the raw chain has no worker mode; use `hop`")


if __name__ == "__main__":
    main()
