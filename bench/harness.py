"""Processes, CPU accounting and one measurement, shared by every system in the benchmark.

A measurement is one batch of jobs through a running system: start the system's collector
and wait until it says ``ready`` (subscribed, groups created), sample the CPU time of every
role process, run the producer, wait for the collector, sample again. Role CPU comes from
psutil (the whole process tree, so Celery's and taskiq's pool children count); the
producer and collector report their own CPU from ``getrusage`` for exactly their loop,
leaving their interpreter start-up out.
"""

from __future__ import annotations

import math
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.peers.loadgen import Report

ROOT = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """A system failed to start or to finish a measurement."""


@dataclass
class Role:
    """A long-running process of the system under test (a hop, a worker, Redis)."""

    label: str
    proc: psutil.Process
    popen: subprocess.Popen[bytes] | None = None

    def cpu(self) -> dict[int, float]:
        """CPU seconds by pid of this process and all its descendants, right now."""
        out: dict[int, float] = {}
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return out
        for p in procs:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass  # a pool child exited between listing and reading
        return out

    def rss(self) -> int:
        """Resident bytes of this process and its descendants."""
        total = 0
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total


def cpu_delta(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds spent per role label between two samples (pids new since count from 0)."""
    return {label: sum(t - before.get(label, {}).get(pid, 0.0) for pid, t in pids.items())
            for label, pids in after.items()}


def sample(roles: Sequence[Role]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for role in roles:
        out.setdefault(role.label, {}).update(role.cpu())
    return out


class Procs:
    """Starts processes with their output in a log directory; stops them all at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(list(argv), cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if stdout_pipe else log, stderr=log,
                                env={**os.environ, **(env or {})})
        log.close()
        self.started.append(proc)
        return proc

    def log_tail(self, name: str, chars: int = 1500) -> str:
        try:
            return (self.log_dir / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, procs: Sequence[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL what is left (and its children) — only our own processes."""
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        child.kill()
                except psutil.NoSuchProcess:
                    pass
                proc.kill()
                proc.wait()
            if proc in self.started:
                self.started.remove(proc)

    def stop_all(self) -> None:
        self.stop(list(self.started), timeout=10.0)


def wait_ready(proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Read ``proc``'s stdout until a line ``ready``; raise if it exits or time runs out."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.1)
        if readable:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            if b"ready\n" in buf:
                return
        elif proc.poll() is not None:
            break
    raise BenchError(f"{what} did not get ready within {timeout:.0f} s (exit status {proc.poll()})")


@dataclass
class Measurement:
    """One batch of jobs through one system."""

    jobs: int
    offered: float
    """Offered jobs/s (0: as fast as possible)."""
    jobs_per_s: float
    latencies_ms: list[float]
    cpu_s: dict[str, float]
    """CPU seconds per role over the batch (producer and collector included)."""
    behind_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    def cpu_per_1k(self) -> dict[str, float]:
        return {k: v / self.jobs * 1000 for k, v in self.cpu_s.items()}

    def pct(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank: an observed value, never interpolated."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) / 100 - 1e-9))  # the epsilon: 99 * 1000 / 100 is 990.0000001
    return ordered[rank - 1]


def measure(procs: Procs, roles: Sequence[Role], client: Sequence[str], args: Sequence[str], *, n: int,
            rate: float, timeout: float, env: dict[str, str] | None = None, tag: str = "m") -> Measurement:
    """Run ``n`` jobs at ``rate`` (0: unpaced) through a running system; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="ib-bench-") as tmp:
        prod_out, col_out = f"{tmp}/producer.json", f"{tmp}/collector.json"
        common = [*args, "--n", str(n), "--timeout", str(timeout)]
        collector = procs.spawn(f"{tag}-collector", [*client, "collect", *common, "--out", col_out], env,
                                stdout_pipe=True)
        try:
            wait_ready(collector, 60.0, f"{tag} collector")
            before = sample(roles)
            producer = procs.spawn(f"{tag}-producer", [*client, "produce", *common, "--rate", str(rate),
                                                       "--out", prod_out], env)
            producer.wait(timeout=timeout + 30)
            collector.wait(timeout=timeout + 30)
            after = sample(roles)
        except (subprocess.TimeoutExpired, BenchError) as exc:
            raise BenchError(f"{tag}: {exc}\n{procs.log_tail(f'{tag}-collector')}\n"
                             f"{procs.log_tail(f'{tag}-producer')}") from None
        finally:
            procs.stop([collector])
            if collector.stdout is not None:
                collector.stdout.close()
        if producer.returncode or not os.path.exists(prod_out) or not os.path.exists(col_out):
            raise BenchError(f"{tag}: producer exit {producer.returncode}, collector exit {collector.returncode}\n"
                             f"{procs.log_tail(f'{tag}-producer')}\n{procs.log_tail(f'{tag}-collector')}")
        prod, col = Report.read(prod_out), Report.read(col_out)
    cpu = cpu_delta(before, after)
    cpu["producer"] = prod.cpu_s
    cpu["collector"] = col.cpu_s
    elapsed = max(col.last - prod.first, 1e-9)
    notes = [x for x in (prod.note, col.note) if x]
    if col.errors:
        notes.append(f"{col.errors} failed results")
    if col.count < n:
        raise BenchError(f"{tag}: only {col.count} of {n} results arrived ({'; '.join(notes)})\n"
                         f"{procs.log_tail(f'{tag}-collector')}")
    return Measurement(jobs=n, offered=rate, jobs_per_s=col.count / elapsed, latencies_ms=col.latencies_ms,
                       cpu_s=cpu, behind_ms=prod.behind_ms, notes=notes)
