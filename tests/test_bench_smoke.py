"""Smoke test of the benchmark suite: ``python -m bench.throughput --quick`` runs end to end.

Tiny batches, one repeat: it proves the harness, the raw chain, the broker's roles and SDK
clients, and every installed peer still work together, not how fast they are. Peers run
only where installed (``python -m bench.throughput --setup-peers``, or Celery from the
``bench`` extra). The full benchmark is run by hand (bench/RESULTS.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.errors import EmbeddedRedisError
from cli.embedded import find_redis_server

ROOT = Path(__file__).resolve().parent.parent
psutil = pytest.importorskip("psutil", reason="the bench extra is not installed: pip install -e '.[bench]'")


@pytest.fixture(scope="module")
def redis_binary() -> str:
    try:
        return find_redis_server()
    except EmbeddedRedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs a redis-server: {exc}")
        pytest.skip(f"no redis-server: {exc}")


@pytest.mark.timeout(120)
def test_quick_benchmark_runs_and_reports(redis_binary: str, tmp_path: Path) -> None:
    from bench.systems import PEERS

    out = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, "-m", "bench.throughput", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-4000:]
    report = out.read_text()
    # A peer is measured where installed, else listed as skipped: never silently missing.
    peers = [p for p in PEERS if f"- skipped {p}: not installed" not in report]
    for system in ["raw", "inference-broker", *peers]:
        row = next((line for line in report.splitlines() if line.startswith(f"| {system} |")), None)
        assert row is not None, f"no row for {system} in:\n{report}"
        jobs_per_s = float(row.split("|")[2].replace(",", ""))
        assert jobs_per_s > 0
    assert "| raw | " in report and "1.000" in report  # the ratios' reference
    assert "redis-server" in report and "## Machine and versions" in report


def test_percentile_is_nearest_rank() -> None:
    from bench.harness import percentile

    values = [float(v) for v in range(1, 1001)]
    assert percentile(values, 50) == 500.0
    assert percentile(values, 99) == 990.0
    assert percentile(values, 99.9) == 999.0
    assert percentile([3.0], 99.9) == 3.0


def test_paced_schedule_is_open_loop() -> None:
    from bench.peers.loadgen import schedule

    slices = list(schedule(50, 1000.0, chunk=10))
    assert slices[0][0] == 0 and slices[-1][1] == 50
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))  # no job skipped or repeated
    dues = [due for _start, _stop, due in slices]
    assert dues == sorted(dues) and dues[-1] - dues[0] < 0.06  # due times follow the rate, not the system


def test_profile_summary_counts_self_and_inclusive() -> None:
    from bench.profile_broker import summarize

    raw = ("thread (1);main (a.py:1);route (b.py:2);encode (c.py:3) 6\n"
           "thread (1);main (a.py:1);route (b.py:2) 2\n"
           "thread (1);main (a.py:1);read (d.py:4) 2\n")
    total, own, incl = summarize(raw, 10)
    assert total == 10
    assert dict(own) == {"encode (c.py)": 6, "route (b.py)": 2, "read (d.py)": 2}
    assert dict(incl)["route (b.py)"] == 8
    assert "main (a.py)" not in dict(incl)  # in every sample: the entry chain, left out


@pytest.mark.timeout(120)
def test_redis_instruction_counts_come_out_per_phase(redis_binary: str) -> None:
    import shutil

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (Debian: apt install valgrind)")
    done = subprocess.run([sys.executable, "-m", "bench.redis_instructions", "--jobs", "300"],
                          capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [int(line.split()[-1].replace(",", "")) for line in done.stdout.splitlines()[1:]]
    assert len(counts) == 2 and all(count > 1000 for count in counts), done.stdout


@pytest.mark.timeout(120)
def test_durability_benchmark_runs_and_prints_its_table(redis_binary: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.durability", "--jobs", "200"],
                          capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [(row[0], row[1]) for row in rows] == [("1", "0"), ("1", "1"), ("100", "0"), ("100", "1")]
    assert all(float(row[4].replace(",", "")) > 0 for row in rows)


@pytest.mark.timeout(120)
def test_quick_shard_benchmark_keeps_each_jobs_commands_on_its_shards_node(redis_binary: str,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "SHARDS.md"
    done = subprocess.run([sys.executable, "-m", "bench.shards", "--quick", "--shards", "1,3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-4000:]
    assert max(len(line) for line in done.stdout.splitlines()) <= 80, done.stdout
    report = out.read_text()
    rows = [line.split("|")[1:-1] for line in report.splitlines() if line.startswith("| ")]
    summary = {r[0].strip(): r for r in rows if len(r) == 8 and r[1].strip().endswith(("+1", "+3"))}
    assert set(summary) == {"1", "3"} and all(float(r[3].replace(",", "")) > 0 for r in summary.values())
    nodes = [[cell.strip() for cell in r] for r in rows if len(r) == 8 and r[1].strip() in "ABC"]
    assert len(nodes) == 6, report  # three primaries, for each S
    # S=1: one node holds the shard; the two others see no per-job command at all.
    idle = [r for r in nodes if r[0] == "1" and r[2] == "-"]
    assert len(idle) == 2 and all(float(r[5].rstrip("\\*")) == 0 for r in idle), report
    # S=3: the shards land on three distinct primaries, each writing exactly 3 XADDs per job of its own.
    busy = [r for r in nodes if r[0] == "3"]
    assert sorted(r[2] for r in busy) == ["0", "1", "2"], report
    assert all(r[7] == "3.000" for r in busy), report
    assert "off by at most 0 (bar: 0)" in report
