"""Throughput, added latency and CPU cost: inference-broker against the raw ceiling and its peers.

::

    python -m bench.throughput                      # full comparison, writes bench/RESULTS.md
    python -m bench.throughput --scale --memory     # plus scaling and memory sections
    python -m bench.throughput --quick              # smoke run, seconds (what CI runs)
    python -m bench.throughput --setup-peers        # once: venvs for Celery, arq and taskiq

One run starts one fresh ``redis-server`` (:class:`cli.embedded.EmbeddedRedis`: loopback,
append-only file with ``everysec``, ``noeviction``: the broker's shipped setting, for every
system alike) and measures, in turn and for each repeat: the raw three-hop redis-py chain,
inference-broker through its SDK with its real role processes, and each installed peer.
Per system and repeat: a warm-up batch (which also sizes the saturation batch), a
saturation batch (jobs/s from the first submission to the last result), then open-loop
batches at 1,000 jobs/s and at half the system's own saturation rate (p50/p99/p99.9 of the
latency each job saw end to end; the tasks do nothing, so all of it is added). Batches
offered more than 90% of a system's saturation rate are skipped as over capacity: their
latency only measures how long the queue grew. Between systems the server is flushed.
Medians over repeats go to the table; the raw chain's median is the ratios' reference.

``--scale`` measures saturation with 1, 2 and 4 policy and pool worker processes (and raw
hops); ``--memory`` pushes a large bounded batch through the broker sampling each role's
resident memory and Redis' ``used_memory`` (:mod:`bench.memory`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis
from rich.console import Console
from rich.table import Table

from bench.harness import ROOT, BenchError, Measurement, Procs, Role, measure
from bench.systems import (
    PEER_PACKAGES,
    PEERS,
    InferenceBroker,
    Peer,
    RawChain,
    System,
    available,
    redis_server_version,
    setup_peers,
    versions,
)
from cli.embedded import EmbeddedRedis, find_redis_server

console = Console(stderr=True, highlight=False)
FIXED_RATE = 1000.0
CAPACITY_SHARE = 0.9
"""Offered loads above this share of a system's saturation rate are not measured."""


@dataclass
class Plan:
    """Per-system sizes fixed in the first repeat so that every repeat does the same work."""

    sat_jobs: int = 0
    max_rate: float = 0.0


@dataclass
class SystemRun:
    """One repeat of one system."""

    sat: Measurement
    loads: dict[str, Measurement | None] = field(default_factory=dict)
    """Offered-load label to its batch; None where it was over capacity."""


@dataclass
class Options:
    repeats: int
    warmup: int
    sat_seconds: float
    sat_min: int
    sat_max: int
    load_seconds: float
    load_min: int
    quick: bool


def _sat_jobs(estimate: float, opts: Options) -> int:
    return int(min(opts.sat_max, max(opts.sat_min, estimate * opts.sat_seconds)))


def _timeout(n: int, rate: float) -> float:
    return n / max(rate, 50.0) * 3 + 30


class Bench:
    """One redis-server, one log directory, and the systems measured on them."""

    def __init__(self, server: EmbeddedRedis, procs: Procs, opts: Options) -> None:
        self.server = server
        self.procs = procs
        self.opts = opts
        self.redis_role = Role("redis", psutil.Process(server.process.pid if server.process else 0))
        self.plans: dict[str, Plan] = {}
        self.flush = redis.Redis.from_url(server.url)

    def run_system(self, system: System, rep: int, *, policy: int = 1, workers: int = 1,
                   loads: bool = True, plan_key: str | None = None) -> SystemRun:
        """Start ``system``, measure it, stop it and flush Redis."""
        key = plan_key or system.name
        plan = self.plans.setdefault(key, Plan())
        run = f"b{rep}{os.getpid() % 10000}{len(self.plans)}"
        url = self.server.url
        env = system.env(url)
        roles = [*system.start(self.procs, url, run, policy=policy, workers=workers), self.redis_role]
        client = system.client()
        tag = f"{system.name}-{key.replace(' ', '')}-r{rep}"

        def batch(phase: str, n: int, rate: float) -> Measurement:
            return measure(self.procs, roles, client, system.client_args(url, run, phase), n=n, rate=rate,
                           timeout=_timeout(n, rate or plan.max_rate or 100.0), env=env, tag=f"{tag}-{phase}")

        try:
            system.wait_ready(url, run, policy, workers)
            if not plan.sat_jobs and self.opts.quick:
                plan.sat_jobs = self.opts.sat_min  # a smoke run: no warm-up, the smallest batch
            elif not plan.sat_jobs:
                warm = batch("warm", self.opts.warmup, 0)
                plan.sat_jobs = _sat_jobs(warm.jobs_per_s, self.opts)
                console.print(f"  [dim]{key}: warm-up {warm.jobs_per_s:,.0f} jobs/s; saturation batch "
                              f"{plan.sat_jobs:,} jobs[/dim]")
            elif not self.opts.quick:
                batch("warm", self.opts.warmup, 0)
            sat = batch("sat", plan.sat_jobs, 0)
            if not plan.max_rate and not self.opts.quick and sat.jobs / sat.jobs_per_s < self.opts.sat_seconds / 2:
                # The warm-up (start-up transients, a cold Redis) underrated the system and the
                # batch was over too soon to be a steady state: size it again from this one.
                plan.sat_jobs = _sat_jobs(sat.jobs_per_s, self.opts)
                console.print(f"  [dim]{key}: saturation batch resized to {plan.sat_jobs:,} jobs[/dim]")
                sat = batch("sat2", plan.sat_jobs, 0)
            plan.max_rate = plan.max_rate or sat.jobs_per_s
            result = SystemRun(sat)
            console.print(f"  {key} repeat {rep + 1}: saturation [bold]{sat.jobs_per_s:,.0f}[/bold] jobs/s "
                          f"({sat.jobs:,} jobs)")
            if loads:
                for label, rate in ((f"{FIXED_RATE:,.0f}/s", FIXED_RATE), ("50%", plan.max_rate / 2)):
                    if rate > CAPACITY_SHARE * plan.max_rate:
                        result.loads[label] = None
                        console.print(f"  {key}: {rate:,.0f} jobs/s is over capacity; not measured")
                        continue
                    n = max(self.opts.load_min, int(rate * self.opts.load_seconds))
                    m = batch(f"load{int(rate)}", n, rate)
                    result.loads[label] = m
                    console.print(f"  {key} at {rate:,.0f} jobs/s: p50 {m.pct(50):.2f} ms, p99 {m.pct(99):.2f} ms, "
                                  f"p99.9 {m.pct(99.9):.2f} ms")
            return result
        finally:
            system.stop(self.procs)
            self.flush.flushall()


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Summary:
    """Medians over repeats of one system."""

    name: str
    jobs_per_s: float
    runs: list[SystemRun]
    max_rate: float

    def load(self, label: str) -> tuple[float, float, float] | None:
        got = [r.loads.get(label) for r in self.runs]
        ms = [m for m in got if m is not None]
        if not ms:
            return None
        return med([m.pct(50) for m in ms]), med([m.pct(99) for m in ms]), med([m.pct(99.9) for m in ms])

    def cpu(self) -> dict[str, float]:
        labels = dict.fromkeys(k for r in self.runs for k in r.sat.cpu_per_1k())
        return {k: med([r.sat.cpu_per_1k().get(k, 0.0) for r in self.runs]) for k in labels}


def summarize(name: str, runs: list[SystemRun], plan: Plan) -> Summary:
    return Summary(name, med([r.sat.jobs_per_s for r in runs]), runs, plan.max_rate)


def fmt_lat(got: tuple[float, float, float] | None) -> str:
    return "over capacity" if got is None else " / ".join(f"{v:.2f}" for v in got)


def fmt_cpu(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in cpu.items())


def table(rows: list[Summary], raw: float) -> Table:
    t = Table(title="jobs/s at saturation; latency p50 / p99 / p99.9 in ms; CPU s per 1,000 jobs at saturation")
    for col in ("system", "jobs/s", "x raw", f"@ {FIXED_RATE:,.0f}/s", "@ 50% of own max", "CPU total", "CPU by role"):
        t.add_column(col, justify="right" if col not in ("system", "CPU by role") else "left")
    for s in rows:
        cpu = s.cpu()
        t.add_row(s.name, f"{s.jobs_per_s:,.0f}", f"{s.jobs_per_s / raw:.3f}" if raw else "-",
                  fmt_lat(s.load(f"{FIXED_RATE:,.0f}/s")), f"{s.max_rate / 2:,.0f}/s: " + fmt_lat(s.load("50%")),
                  f"{sum(cpu.values()):.3f}", fmt_cpu(cpu))
    return t


def markdown_table(rows: list[Summary], raw: float) -> str:
    lines = ["| system | jobs/s | × raw | p50 / p99 / p99.9 ms @ 1,000/s | offered 50% | "
             "p50 / p99 / p99.9 ms @ 50% | CPU s / 1k jobs | CPU by role |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in rows:
        cpu = s.cpu()
        ratio = f"{s.jobs_per_s / raw:.3f}" if raw else "-"
        lines.append(f"| {s.name} | {s.jobs_per_s:,.0f} | {ratio} | "
                     f"{fmt_lat(s.load(f'{FIXED_RATE:,.0f}/s'))} | {s.max_rate / 2:,.0f}/s | "
                     f"{fmt_lat(s.load('50%'))} | {sum(cpu.values()):.3f} | {fmt_cpu(cpu)} |")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return {"host": platform.node(), "os": platform.platform(), "cpu": cpu, "cores": str(os.cpu_count()),
            "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB", "python": platform.python_version(),
            "load average at start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny batches, one repeat, seconds")
    p.add_argument("--repeats", type=int, help="repeats per system (default 3; quick 1)")
    p.add_argument("--systems", default="raw,inference-broker,celery,arq,taskiq",
                   help="comma-separated; peers that are not installed are skipped with a note")
    p.add_argument("--sat-seconds", type=float, help="target length of a saturation batch (default 6 s)")
    p.add_argument("--max-jobs", type=int, help="largest saturation batch (default 200,000)")
    p.add_argument("--load-seconds", type=float, help="length of each offered-load batch (default 10 s)")
    p.add_argument("--peer-workers", type=int, default=2, help="worker processes per peer (default: one per core)")
    p.add_argument("--scale", action="store_true", help="also measure 1/2/4 policy and pool worker processes")
    p.add_argument("--scale-set", default="1x1,1x2,2x2,2x4,4x4",
                   help="POLICYxWORKERS process counts for --scale")
    p.add_argument("--memory", action="store_true", help="also run the memory section (bench.memory)")
    p.add_argument("--memory-jobs", type=int, default=200_000, help="jobs pushed in the memory section")
    p.add_argument("--no-main", action="store_true", help="skip the comparison (with --scale/--memory)")
    p.add_argument("--out", type=Path, help="report file (default bench/RESULTS.md; quick: none)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument("--setup-peers", action="store_true", help="create bench/.venvs/<peer> for each peer and exit")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> Options:
    if args.quick:
        return Options(repeats=args.repeats or 1, warmup=100, sat_seconds=args.sat_seconds or 0.3, sat_min=300,
                       sat_max=args.max_jobs or 3000, load_seconds=args.load_seconds or 0.2, load_min=100,
                       quick=True)
    return Options(repeats=args.repeats or 3, warmup=1000, sat_seconds=args.sat_seconds or 6.0, sat_min=3000,
                   sat_max=args.max_jobs or 200_000, load_seconds=args.load_seconds or 10.0, load_min=2000,
                   quick=False)


def systems(names: list[str], peer_workers: int) -> tuple[list[System], list[str]]:
    out: list[System] = []
    skipped: list[str] = []
    installed = available([n for n in names if n in PEERS])
    for name in names:
        if name == "raw":
            out.append(RawChain())
        elif name == "inference-broker":
            out.append(InferenceBroker())
        elif name in PEERS and name in installed:
            peer = Peer(name, installed[name])
            peer.worker_processes = peer_workers
            out.append(peer)
        elif name in PEERS:
            skipped.append(f"{name}: not installed (python -m bench.throughput --setup-peers)")
        else:
            raise SystemExit(f"unknown system {name!r}")
    return out, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.setup_peers:
        setup_peers(list(PEERS))
        return 0
    opts = options(args)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    chosen, skipped = systems(names, args.peer_workers)
    for s in skipped:
        console.print(f"[yellow]skipping {s}[/yellow]")
    out = args.out if args.out is not None else (None if args.quick else ROOT / "bench" / "RESULTS.md")
    started = dt.datetime.now(dt.UTC)
    info = machine()
    binary = find_redis_server()
    sections: list[str] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="ib-bench-logs-") as logs:
        procs = Procs(Path(logs))
        server = EmbeddedRedis().start()
        try:
            bench = Bench(server, procs, opts)
            console.print(f"redis-server {redis_server_version(binary)} on {server.url}; logs in {logs}")
            if not args.no_main:
                sections.append(compare(bench, chosen, opts, skipped))
            if args.scale:
                sections.append(scale(bench, opts, args.scale_set))
            if args.memory:
                from bench.memory import memory_section

                sections.append(memory_section(server, procs, args.memory_jobs, console))
        except BenchError as exc:
            console.print(f"[red]benchmark failed:[/red] {exc}")
            ok = False
        finally:
            procs.stop_all()
            server.stop()
    if ok and out is not None and sections:
        out.write_text(report(started, info, binary, chosen, opts, args, sections))
        console.print(f"wrote {out}")
    return 0 if ok else 1


def compare(bench: Bench, chosen: list[System], opts: Options, skipped: list[str]) -> str:
    runs: dict[str, list[SystemRun]] = {s.name: [] for s in chosen}
    for rep in range(opts.repeats):
        for system in chosen:
            console.print(f"[bold]{system.name}[/bold] (repeat {rep + 1}/{opts.repeats})")
            runs[system.name].append(bench.run_system(system, rep))
    rows = [summarize(s.name, runs[s.name], bench.plans[s.name]) for s in chosen]
    raw = next((r.jobs_per_s for r in rows if r.name == "raw"), 0.0)
    Console(highlight=False, width=200).print(table(rows, raw))
    per_repeat = ["| system | " + " | ".join(f"repeat {i + 1}" for i in range(opts.repeats)) + " |",
                  "|---|" + "---:|" * opts.repeats]
    for r in rows:
        per_repeat.append(f"| {r.name} | " + " | ".join(f"{x.sat.jobs_per_s:,.0f}" for x in r.runs) + " |")
    skipped_md = "".join(f"\n- skipped {s}" for s in skipped)
    return (f"## Comparison\n\n{outcomes(rows)}{markdown_table(rows, raw)}\n\nMedians over {opts.repeats} repeat(s). "
            f"Saturation batches per system: "
            + ", ".join(f"{s.name} {bench.plans[s.name].sat_jobs:,}" for s in chosen)
            + f" jobs. Offered-load batches last {opts.load_seconds:g} s (at least {opts.load_min:,} jobs)."
            + f"{skipped_md}\n\nSaturation jobs/s per repeat:\n\n" + "\n".join(per_repeat) + "\n")


def scale(bench: Bench, opts: Options, spec: str) -> str:
    pairs = [tuple(int(x) for x in item.split("x")) for item in spec.split(",") if item]
    lines = ["| policy x workers | inference-broker jobs/s | raw jobs/s (hops) | broker CPU s / 1k jobs |",
             "|---|---:|---:|---:|"]
    for policy, workers in pairs:
        label = f"{policy}x{workers}"
        results: dict[str, list[SystemRun]] = {"inference-broker": [], "raw": []}
        for rep in range(opts.repeats):
            for system in (InferenceBroker(), RawChain()):
                console.print(f"[bold]scale {label}[/bold] {system.name} (repeat {rep + 1}/{opts.repeats})")
                results[system.name].append(bench.run_system(system, rep, policy=policy, workers=workers,
                                                              loads=False, plan_key=f"{system.name} {label}"))
        b = summarize("b", results["inference-broker"], bench.plans[f"inference-broker {label}"])
        r = summarize("r", results["raw"], bench.plans[f"raw {label}"])
        lines.append(f"| {label} | {b.jobs_per_s:,.0f} | {r.jobs_per_s:,.0f} | {sum(b.cpu().values()):.3f} |")
        console.print(f"  scale {label}: broker {b.jobs_per_s:,.0f} jobs/s, raw {r.jobs_per_s:,.0f} jobs/s")
    return ("## Scale\n\nSaturation throughput as the broker's policy and pool worker processes (and the raw "
            "chain's hop processes) go from 1 to 4, medians over "
            f"{opts.repeats} repeat(s), on {os.cpu_count()} cores shared with Redis, the producer and the "
            "collector.\n\n" + "\n".join(lines) + "\n")


def command_line() -> str:
    """This run's arguments as typed, less the ``--note`` texts (they appear under Notes)."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            args.append(shlex.quote(arg))
    return " ".join(args)


def outcomes(rows: list[Summary]) -> str:
    """The issue's two bars, checked against this run's medians."""
    by = {r.name: r for r in rows}
    raw, broker = by.get("raw"), by.get("inference-broker")
    if raw is None or broker is None:
        return ""
    share = broker.jobs_per_s / raw.jobs_per_s
    raw_lat, broker_lat = raw.load(f"{FIXED_RATE:,.0f}/s"), broker.load(f"{FIXED_RATE:,.0f}/s")
    lines = [f"- throughput: inference-broker reaches {share:.1%} of the raw ceiling (target: at least 50%): "
             f"**{'met' if share >= 0.5 else 'not met'}**."]
    if raw_lat and broker_lat:
        gap = broker_lat[1] - raw_lat[1]
        lines.append(f"- p99 at {FIXED_RATE:,.0f} jobs/s: {broker_lat[1]:.2f} ms against the raw chain's "
                     f"{raw_lat[1]:.2f} ms, {gap:+.2f} ms (target: within 2 ms): "
                     f"**{'met' if gap <= 2 else 'not met'}**.")
    return "\n".join(lines) + "\n\n"


def report(started: dt.datetime, info: dict[str, str], binary: str, chosen: list[System], opts: Options,
           args: argparse.Namespace, sections: list[str]) -> str:
    main_versions = versions(sys.executable, ["redis", "hiredis", "msgspec", "uvloop", "psutil",
                                              "inference-broker"])
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `python -m bench.throughput {command_line()}` on "
        f"{started:%Y-%m-%d %H:%M} UTC ({time.time() - started.timestamp():.0f} s). Method: "
        "the docstring of `bench/throughput.py`; latency is from the producer's submit call to "
        "the collector seeing the result, for tasks that do nothing (inference-broker: the "
        "instant device of `bench/bench.toml`).",
        "",
        "## Machine and versions",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- redis-server {redis_server_version(binary)} ({binary}), loopback TCP, appendonly yes "
        "(everysec), noeviction; flushed between systems",
        "- broker environment: " + ", ".join(f"{k} {v}" for k, v in main_versions.items()),
    ]
    for system in chosen:
        if isinstance(system, Peer):
            vs = versions(system.python, PEER_PACKAGES[system.name])
            lines.append(f"- {system.name} environment ({system.python}): "
                         + ", ".join(f"{k} {v}" for k, v in vs.items()))
    lines += [
        "",
        "## Settings",
        "",
        "- raw: 2 hop processes (ingress -> pool -> results), XREADGROUP COUNT 256, XADD + XACK in one "
        "pipeline, hiredis, msgspec msgpack; producer pipelines XADDs 256 at a time; collector XREAD COUNT 1024.",
        "- inference-broker: `python -m cli policy` and `python -m cli worker --pool bench` with "
        "`bench/bench.toml` (pool `bench`, profile `instant`, concurrency 256), every setting at its default "
        "(claims, leases, fenced completion, dedup keys, deletion after ack, retention, janitor, heartbeats); "
        "producer: `Client.submit_many` (chunks of 256); collector: `Client.results` through a consumer group.",
        f"- celery: prefork pool, concurrency {args.peer_workers}, prefetch multiplier 64, rate limits off, "
        "without gossip/mingle/heartbeat; Redis broker and result backend; results via `ResultSet.join_native`.",
        f"- arq: {args.peer_workers} worker processes, max_jobs 256, poll_delay 0.01 s; results via "
        "`Job.result(poll_delay=0.001)` in submission order.",
        f"- taskiq: taskiq-redis `RedisStreamBroker` (defaults: XREADGROUP COUNT 100) with "
        f"`RedisAsyncResultBackend`; `taskiq worker --workers {args.peer_workers}` (100 async tasks each); "
        "results via `wait_result(check_interval=0.001)` in submission order.",
        f"- repeats {opts.repeats}; saturation batch about {opts.sat_seconds:g} s of each system's warm-up rate "
        f"({opts.sat_min:,}-{opts.sat_max:,} jobs); offered-load batches {opts.load_seconds:g} s; loads over "
        f"{CAPACITY_SHARE:.0%} of a system's saturation rate are not measured.",
        "- CPU: psutil per role process tree (Redis included), getrusage of the producer and collector for "
        "their loops only; divided by the jobs of the saturation batch.",
        "",
        *sections,
    ]
    notes = [*args.note]
    load = os.getloadavg()
    notes.append(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
