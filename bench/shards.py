"""Shards on a local Redis Cluster: throughput, Redis CPU and commands per job for S = 1, 2, 3.

::

    python -m bench.shards              # full run (about 3 minutes), writes bench/SHARDS.md
    python -m bench.shards --quick      # smoke run, seconds (tests/test_bench_smoke.py)

One run starts a local cluster of three primaries (:class:`cli.cluster.EmbeddedCluster`:
loopback, append-only, no replicas) and, for each S, a deployment of S shards under a
prefix chosen so that each shard's hash tag lands on a different primary (where the slots
are is read from ``CLUSTER SLOTS``, never assumed, and reported). Its roles are S policy
workers and S pool workers, ``python -m cli policy|worker --pool bench`` with
``IB_SHARDS=S`` and ``bench/bench.toml`` (the instant device), every setting at its
default, as in :mod:`bench.throughput`. No option gives a role a subset of the shards (a
role serves every shard), so each of the S processes of a role reads all S shards and the
consumer groups share the work out: one process per shard per role in number, not in
assignment. One producer (``Client.submit_many``, which sends each job to its shard's
ingress) and one collector (``Client.results``, merged over the shards' result streams),
:mod:`bench.broker_load`, with ``--shards S``.

Per S and repeat: a warm-up batch that also sizes the saturation batch, then the
saturation batch (jobs/s from the first submission to the last result). Around the
saturation batch every node's ``INFO cpu`` and ``INFO commandstats`` are read; the deltas
give each node's Redis CPU (``used_cpu_sys + used_cpu_user``) and calls per command, and
are divided by the jobs whose shard (:func:`broker.topology.shard_of` of the job id) the
node holds. Commands a script runs count on their own as well as in ``evalsha``; the
probe's own ``INFO`` calls are left out. Repeats alternate S (1, 2, 3, 1, 2, 3) so that a
change in the machine's load falls on every S alike; per node, deltas and jobs are summed
over the repeats. Between runs the roles stop and every primary is flushed.

What it shows: a node that holds no shard of the deployment sees next to no commands per
job, every node's XADDs are exactly 3 per job of its own shards (ingress, pool lane,
result), and commands per job are the same on every node and S: no per-job command
crosses shards. Redis CPU per job of a node's own shards stays near one shard's as S
grows (:data:`FLAT_CPU` says why it may rise a little on this machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import redis
from rich.console import Console

from bench.broker_load import job
from bench.harness import ROOT, BenchError, Measurement, Procs, measure
from bench.systems import InferenceBroker, redis_server_version, versions
from bench.throughput import command_line, machine
from broker.topology import Topology, shard_of
from cli.cluster import EmbeddedCluster
from cli.embedded import find_redis_server
from cli.stack import wait_for_roles

console = Console(stderr=True, highlight=False)
PRIMARIES = 3
SCRIPTS = ("evalsha", "eval", "fcall")
PROBE = ("info",)
"""Commands this benchmark sends itself (its counts are left out)."""
IDLE_MAX = 0.01
"""Most commands per job a node with no shard may see for the run to count as crossing-free."""
FLAT = 0.15
"""Largest relative spread of per-job commands among the nodes holding shards."""
FLAT_CPU = 0.25
"""Largest rise of a node's Redis CPU per job of its shards over one shard's. Looser than
:data:`FLAT`: the processes on this machine's 2 cores bound the total rate, so each node of
S shards sees 1/S of the jobs a lone shard sees, read by S policy and S pool workers, and a
script call or a read carries fewer jobs (``scripts/job`` grows with S); at the projected
scale every node runs at its own limit, as the lone shard does here."""


@dataclass
class NodeStats:
    """One node's counters at one moment."""

    cpu_s: float
    calls: dict[str, int]

    @classmethod
    def read(cls, client: redis.Redis) -> NodeStats:
        cpu: dict[str, Any] = client.info("cpu")  # type: ignore[assignment] # sync client: a dict
        stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
        return cls(float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                   {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})

    def minus(self, before: NodeStats) -> NodeStats:
        return NodeStats(self.cpu_s - before.cpu_s,
                         {k: n - before.calls.get(k, 0) for k, n in self.calls.items()
                          if k not in PROBE and n - before.calls.get(k, 0)})

    def plus(self, other: NodeStats) -> NodeStats:
        keys = self.calls.keys() | other.calls.keys()
        return NodeStats(self.cpu_s + other.cpu_s, {k: self.calls.get(k, 0) + other.calls.get(k, 0) for k in keys})


@dataclass
class NodeRow:
    """What one node did for one S, summed over the repeats."""

    port: int
    shards: list[int]
    jobs: int = 0
    """Jobs of the node's shards."""
    all_jobs: int = 0
    """Jobs of the whole deployment (the denominator for a node with no shard)."""
    stats: NodeStats = field(default_factory=lambda: NodeStats(0.0, {}))

    @property
    def per(self) -> int:
        return self.jobs or self.all_jobs

    def cpu_us(self) -> float:
        return self.stats.cpu_s * 1e6 / max(self.per, 1)

    def calls(self, names: Sequence[str] | None = None) -> float:
        picked = self.stats.calls if names is None else {k: self.stats.calls.get(k, 0) for k in names}
        return sum(picked.values()) / max(self.per, 1)


@dataclass
class ShardRun:
    """All repeats of one S."""

    shards: int
    prefix: str
    placement: list[tuple[int, int, int]]
    """(shard, its slot, the port of the primary serving it)."""

    def port_of(self, shard: int) -> int:
        return next(port for i, _, port in self.placement if i == shard)
    sats: list[Measurement] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    """1-minute load average when each saturation batch started."""
    nodes: dict[int, NodeRow] = field(default_factory=dict)

    def jobs_per_s(self) -> float:
        return statistics.median(m.jobs_per_s for m in self.sats) if self.sats else math.nan

    def redis_us(self) -> float:
        jobs = sum(m.jobs for m in self.sats)
        return sum(n.stats.cpu_s for n in self.nodes.values()) * 1e6 / max(jobs, 1)

    def role_us(self, label: str) -> float:
        jobs = sum(m.jobs for m in self.sats)
        return sum(m.cpu_s.get(label, 0.0) for m in self.sats) * 1e6 / max(jobs, 1)


@dataclass
class Options:
    shards: list[int]
    repeats: int
    warmup: int
    sat_seconds: float
    sat_min: int
    sat_max: int
    quick: bool


def place(shards: int, cluster: EmbeddedCluster) -> tuple[str, list[tuple[int, int, int]]]:
    """A prefix whose S shard tags land on as many distinct primaries as there are, and
    (shard, slot, port) for each (:meth:`~cli.cluster.EmbeddedCluster.placement`)."""
    for n in count():
        prefix = f"s{shards}p{n}"
        found = cluster.placement(Topology(prefix, shards))
        if len({port for _, _, port in found}) == min(shards, cluster.primaries):
            return prefix, found
    raise AssertionError("unreachable")


class Bench:
    """The cluster, its node clients, and the runs measured on it."""

    def __init__(self, cluster: EmbeddedCluster, procs: Procs, opts: Options) -> None:
        self.cluster = cluster
        self.procs = procs
        self.opts = opts
        self.url = cluster.url
        self.nodes = {node.port: redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=10)
                      for node in cluster.nodes}

    def snapshot(self) -> dict[int, NodeStats]:
        return {port: NodeStats.read(client) for port, client in self.nodes.items()}

    def close(self) -> None:
        for client in self.nodes.values():
            client.close()

    def flush(self) -> None:
        for client in self.nodes.values():
            client.flushall()

    def run(self, shard_run: ShardRun, rep: int) -> None:
        """One repeat of one S: start its roles, warm up, measure saturation, stop, flush."""
        s, prefix = shard_run.shards, shard_run.prefix
        # A smoke run measures nothing: short blocking reads make its roles stop (and wake) sooner.
        system = InferenceBroker(shards=s, settings={"IB_BLOCK_MS": "200"} if self.opts.quick else None)
        roles = system.start(self.procs, self.url, prefix, policy=s, workers=s)
        env = system.env(self.url)
        label = f"S={s} repeat {rep + 1}"

        def batch(phase: str, n: int) -> Measurement:
            return measure(self.procs, roles, system.client(), system.client_args(self.url, prefix, phase),
                           n=n, rate=0, timeout=n / 500 + 30, env=env, tag=f"s{s}-r{rep}-{phase}")

        try:
            # Heartbeats live on shard 0: its primary answers for them (a node client, not the cluster's).
            home = f"redis://127.0.0.1:{shard_run.port_of(0)}"
            wait_for_roles(home, Topology(prefix, s), {"bench": s}, timeout=60, check=system.check_alive)
            if self.opts.quick:
                n = self.opts.sat_min
            else:
                warm = batch("warm", self.opts.warmup)
                n = int(min(self.opts.sat_max, max(self.opts.sat_min, warm.jobs_per_s * self.opts.sat_seconds)))
                console.print(f"  [dim]{label}: warm-up {warm.jobs_per_s:,.0f} jobs/s; "
                              f"saturation batch {n:,} jobs[/dim]")
            shard_run.loads.append(os.getloadavg()[0])
            before = self.snapshot()
            sat = batch("sat", n)
            after = self.snapshot()
        finally:
            system.stop(self.procs)
        self.flush()
        shard_run.sats.append(sat)
        ids = [job(prefix, "sat", i).id for i in range(n)]
        jobs_of = {shard: 0 for shard in range(s)}
        for job_id in ids:
            jobs_of[shard_of(job_id, s)] += 1
        for port in self.nodes:
            row = shard_run.nodes.setdefault(
                port, NodeRow(port, [shard for shard, _, p in shard_run.placement if p == port]))
            row.jobs += sum(jobs_of[shard] for shard in row.shards)
            row.all_jobs += n
            row.stats = row.stats.plus(after[port].minus(before[port]))
        console.print(f"  {label}: saturation [bold]{sat.jobs_per_s:,.0f}[/bold] jobs/s ({n:,} jobs), "
                      f"load {shard_run.loads[-1]:.2f}")


def node_names(cluster: EmbeddedCluster) -> dict[int, str]:
    """Port to a short name: A, B, C in the order the cluster was formed (of its slot ranges)."""
    return {node.port: "ABCDEFGHIJ"[i] for i, node in enumerate(cluster.nodes)}


def summary_lines(runs: list[ShardRun], markdown: bool) -> list[str]:
    head = ("S", "procs", "jobs", "jobs/s", "Redis µs/job", "policy µs/job", "worker µs/job", "load")
    rows = [(str(r.shards), f"{r.shards}+{r.shards}", f"{sum(m.jobs for m in r.sats):,}",
             f"{r.jobs_per_s():,.0f}", f"{r.redis_us():.1f}", f"{r.role_us('policy'):.1f}",
             f"{r.role_us('worker'):.1f}", " ".join(f"{x:.1f}" for x in r.loads)) for r in runs]
    return _table(head, rows, markdown)


def node_lines(runs: list[ShardRun], names: dict[int, str], markdown: bool) -> list[str]:
    head = ("S", "node", "shards", "jobs", "Redis µs/job", "cmds/job", "scripts/job", "XADD/job")
    rows = []
    for r in runs:
        for port, n in sorted(r.nodes.items(), key=lambda item: names[item[0]]):
            mark = "" if n.shards else "\\*" if markdown else "*"
            rows.append((str(r.shards), names[port],
                         ",".join(map(str, n.shards)) or "-", f"{n.jobs:,}", f"{n.cpu_us():.1f}{mark}",
                         f"{n.calls():.3f}{mark}", f"{n.calls(SCRIPTS):.3f}{mark}",
                         f"{n.calls(('xadd',)):.3f}{mark}"))
    return _table(head, rows, markdown)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head),
                *("| " + " | ".join(row) + " |" for row in rows)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    return [" ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in (head, *rows)]


@dataclass
class Findings:
    """The two claims, checked against the numbers."""

    idle_max: float | None
    """Most commands per job on a node holding no shard (None: every node held one)."""
    spread: float
    """Largest relative spread of commands per job among the nodes holding shards, over every S."""
    cpu_ratio: dict[int, float]
    """Per S, the largest Redis CPU per job of a node holding shards over S=1's."""
    xadds: int
    """XADDs per job on the one-shard run's node (ingress, pool lane, result entry)."""
    xadd_off: int
    """Largest difference, over nodes and S, between a node's XADD calls and ``xadds`` x its jobs."""

    @property
    def crossing_free(self) -> bool:
        return ((self.idle_max is None or self.idle_max <= IDLE_MAX) and self.spread <= FLAT
                and self.xadd_off == 0)

    @property
    def flat(self) -> bool:
        return all(abs(x - 1) <= FLAT_CPU for x in self.cpu_ratio.values())

    def lines(self) -> list[str]:
        idle = ("every node held a shard in every run" if self.idle_max is None else
                f"a node holding no shard saw at most {self.idle_max:.4f} commands per job (bar: {IDLE_MAX})")
        ratios = ", ".join(f"S={s} {x:.2f}" for s, x in sorted(self.cpu_ratio.items()))
        return [f"- no per-job command crosses shards: {idle}; every node's XADD calls are "
                f"{self.xadds} x the jobs of its own shards, off by at most {self.xadd_off} (bar: 0); "
                f"commands per job on the nodes holding shards differ by at most {self.spread:.1%} "
                f"across nodes and S (bar: {FLAT:.0%}): **{'shown' if self.crossing_free else 'not shown'}**.",
                f"- per-shard cost stays flat: the busiest node's Redis CPU per job of its shards, "
                f"over S=1's: {ratios} (bar: within {FLAT_CPU:.0%}): **{'shown' if self.flat else 'not shown'}**."]


def findings(runs: list[ShardRun]) -> Findings:
    idle = [n.calls() for r in runs for n in r.nodes.values() if not n.shards]
    busy = [n.calls() for r in runs for n in r.nodes.values() if n.shards]
    spread = (max(busy) - min(busy)) / statistics.mean(busy) if busy else math.nan
    base = next((r for r in runs if r.shards == 1), runs[0])
    ref = max(n.cpu_us() for n in base.nodes.values() if n.shards)
    ratio = {r.shards: max(n.cpu_us() for n in r.nodes.values() if n.shards) / ref for r in runs}
    xadds = round(max(n.calls(("xadd",)) for n in base.nodes.values() if n.shards))
    off = max(abs(n.stats.calls.get("xadd", 0) - xadds * n.jobs) for r in runs for n in r.nodes.values())
    return Findings(max(idle) if idle else None, spread, ratio, xadds, off)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: one small batch per S, no warm-up")
    p.add_argument("--shards", default="1,2,3", help="comma-separated shard counts (default 1,2,3)")
    p.add_argument("--repeats", type=int, help="repeats per S (default 3; quick 1)")
    p.add_argument("--sat-seconds", type=float, default=6.0, help="target length of a saturation batch")
    p.add_argument("--max-jobs", type=int, default=120_000, help="largest saturation batch")
    p.add_argument("--out", type=Path, help="report file (default bench/SHARDS.md; quick: none)")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> Options:
    shards = [int(x) for x in args.shards.split(",") if x.strip()]
    if not shards or min(shards) < 1:
        raise SystemExit("--shards takes positive counts, e.g. 1,2,3")
    if args.quick:
        return Options(shards, args.repeats or 1, 0, 0.0, 300, 300, quick=True)
    return Options(shards, args.repeats or 3, 2000, args.sat_seconds, 5000, args.max_jobs, quick=False)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    opts = options(args)
    out = args.out if args.out is not None else (None if opts.quick else ROOT / "bench" / "SHARDS.md")
    started = dt.datetime.now(dt.UTC)
    info = machine()
    runs: list[ShardRun] = []
    with tempfile.TemporaryDirectory(prefix="ib-bench-shards-") as logs:
        procs = Procs(Path(logs))
        cluster = EmbeddedCluster(primaries=PRIMARIES, owned=True).start()
        bench = Bench(cluster, procs, opts)
        try:
            console.print(f"{PRIMARIES} primaries on ports {', '.join(str(p) for p in sorted(bench.nodes))}; "
                          f"logs in {logs}")
            for s in opts.shards:
                prefix, where = place(s, cluster)
                runs.append(ShardRun(s, prefix, where))
                console.print(f"S={s}: prefix {prefix}, " + ", ".join(
                    f"shard {i} -> :{port}" for i, _, port in where))
            for rep in range(opts.repeats):
                for shard_run in runs:
                    console.print(f"[bold]S={shard_run.shards}[/bold] (repeat {rep + 1}/{opts.repeats})")
                    bench.run(shard_run, rep)
        except BenchError as exc:
            console.print(f"[red]benchmark failed:[/red] {exc}")
            return 1
        finally:
            procs.stop_all()
            bench.close()
            cluster.stop()
    found = findings(runs)
    names = node_names(cluster)
    print("\n".join(summary_lines(runs, markdown=False)))
    print()
    print("\n".join(node_lines(runs, names, markdown=False)))
    print("* a node holding no shard: per job of the whole deployment")
    for line in found.lines():
        print(textwrap.fill(line.replace("**", ""), width=80, subsequent_indent="  "))
    if out is not None:
        out.write_text(report(started, info, runs, found, opts, names))
        console.print(f"wrote {out}")
    return 0


def report(started: dt.datetime, info: dict[str, str], runs: list[ShardRun], found: Findings, opts: Options,
           names: dict[int, str]) -> str:
    binary = find_redis_server()
    env = versions(sys.executable, ["redis", "hiredis", "msgspec", "uvloop", "inference-broker"])
    load = os.getloadavg()
    placement = [f"- S={r.shards}: prefix `{r.prefix}`, " + ", ".join(
        f"shard {i} (`{{{Topology(r.prefix, r.shards).at(i).tag}}}`, slot {slot}) on node {names[port]}"
        for i, slot, port in r.placement) for r in runs]
    return "\n".join([
        "# Shards on a Redis Cluster: cost per job as S grows",
        "",
        f"Produced by `{' '.join(['python -m bench.shards', command_line()]).strip()}` on "
        f"{started:%Y-%m-%d %H:%M} UTC "
        f"({time.time() - started.timestamp():.0f} s). Method: the docstring of `bench/shards.py`.",
        "",
        "## Machine and versions",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"- redis-server {redis_server_version(binary)} ({binary}), {PRIMARIES} primaries, no replicas, "
        "loopback TCP, appendonly yes (everysec), cluster-node-timeout 2000 ms",
        "- environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        f"- repeats {opts.repeats} per S, alternating S; saturation batch about {opts.sat_seconds:g} s of "
        f"the warm-up rate ({opts.sat_min:,}-{opts.sat_max:,} jobs)",
        "",
        "## Placement",
        "",
        *placement,
        "",
        "Nodes: " + ", ".join(f"{name} = :{port}" for port, name in names.items())
        + " (slots asked of the cluster, `CLUSTER SLOTS`). Every role process serves all S shards "
        "(no setting gives a role a subset of them): "
        "`procs` S+S below is S policy workers and S pool workers, each reading every shard.",
        "",
        "## Throughput and CPU per job",
        "",
        *summary_lines(runs, markdown=True),
        "",
        "jobs/s: median over the repeats. Redis µs/job: every node's CPU over the saturation "
        "batches (INFO cpu deltas) per job. policy/worker µs/job: the role processes' CPU "
        "(psutil), all S of them. load: the 1-minute load average as each repeat's batch started. "
        "jobs/s per repeat: " + "; ".join(f"S={r.shards} " + ", ".join(f"{m.jobs_per_s:,.0f}" for m in r.sats)
                                         for r in runs) + ".",
        "",
        "## Per node",
        "",
        *node_lines(runs, names, markdown=True),
        "",
        "Per job of the node's own shards (\\*: a node holding no shard, per job of the whole "
        "deployment). cmds: every call INFO commandstats counted (the probe's INFO left out; a "
        "script's own calls count in it and in `scripts`); scripts: EVALSHA + EVAL; XADD: "
        "ingress, pool lane and result entries, most of them from scripts.",
        "",
        "## What it shows",
        "",
        *found.lines(),
        "",
        "This machine has 2 cores shared by the three Redis nodes, the 2S role processes, the "
        "producer, the collector and other work (the load averages above), so jobs/s is bounded "
        "by the Python processes and moves with the load; it is not a scaling figure. The "
        "comparison across S is the cost per job, which load moves less (the repeats alternate S "
        "so that a change of load falls on every S alike). Redis CPU per job of a node's own "
        "shards is the per-shard cost that docs/architecture.md projects from. It may rise a "
        "little with S here: the total rate is bounded by these 2 cores, so each of S nodes sees "
        "1/S of it, read by S policy and S pool worker processes, and each script call and read "
        "carries fewer jobs (scripts/job above); the projection takes the highest per-node "
        "figure of the run.",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
