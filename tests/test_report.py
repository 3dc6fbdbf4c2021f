"""`inference-broker results --export` and `report`: a real run in, PNGs and one HTML page out.

A short workload goes through real role processes; its results are exported with the CLI,
then reported on from the file and from the stream. The PNGs must open as images and the
page must carry every panel, the numbers of the run and nothing fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from matplotlib import image

from broker.client import Client
from broker.config import load_config
from broker.errors import BrokerError
from broker.wire import Metrics, Result, Timing
from cli import plots, report
from cli.runstats import busy_costs, group_stats
from tests.conftest import ROOT, Roles
from tests.helpers import mixed_jobs

CLI = [sys.executable, "-m", "cli"]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "IB_PREFIX", "IB_CONFIG")}
    return subprocess.run([*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


async def test_export_and_report_a_real_run(roles: Roles, redis_url: str, prefix: str, tmp_path: Path) -> None:
    roles.policy()
    roles.worker("gpu")
    roles.worker("accel")
    jobs = mixed_jobs(40, seed=5, tag="rep")
    async with Client(redis_url, prefix=prefix) as client:
        await client.submit_many(jobs)
        got = await asyncio.gather(*(client.result(j.id, timeout=30) for j in jobs))
    where = ["--redis-url", redis_url, "--prefix", prefix]

    exported = tmp_path / "results.jsonl"
    done = cli("results", *where, "--export", str(exported))
    assert done.returncode == 0, done.stderr
    assert "exported 40 result(s)" in done.stderr and done.stdout == ""
    lines = exported.read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(j.id for j in jobs)

    out = tmp_path / "from-file"
    done = cli("report", "--input", str(exported), "--out", str(out), "--title", "Test run")
    assert done.returncode == 0, done.stderr
    assert f"40 results from {exported}" in done.stdout

    for name in plots.FIGURES:
        pixels = image.imread(out / name)  # opens as a PNG
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 1000, (name, pixels.shape)
        assert pixels.std() > 0.01, f"{name} is blank"

    page = (out / "index.html").read_text()
    for heading, _caption in plots.FIGURES.values():
        assert heading in page
    assert page.count('src="data:image/png;base64,') == len(plots.FIGURES)
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must be self-contained"
    assert "<h1>Test run</h1>" in page and "40 jobs over" in page
    for slo, count in Counter(r.slo for r in got).items():
        assert re.search(rf"<tr><td>{slo}</td><td>{count}</td><td>{count}</td><td>0</td>", page), slo
    for pool, count in Counter(r.pool for r in got).items():
        assert f"<tr><td>{pool}</td><td>{count}</td><td>{100 * count / 40:.1f}%</td>" in page
    interactive = group_stats("interactive", [r for r in got if r.slo == "interactive"])
    assert interactive.ttft_p50_ms is not None
    assert f"<td>{interactive.ttft_p50_ms:.0f} ms</td>" in page or f"{interactive.ttft_p50_ms / 1000:.2f} s" in page

    # Straight from the stream: the same run, the same table.
    live = tmp_path / "from-stream"
    done = cli("report", *where, "--out", str(live))
    assert done.returncode == 0, done.stderr
    table = re.compile(r'<h2 id="summary">.*?</table>', re.S)
    assert table.search((live / "index.html").read_text()).group() == table.search(page).group()  # type: ignore[union-attr]


def _result(job_id: str, worker: str, start: float, end: float, *, pool: str = "gpu", tokens: int = 10) -> Result:
    t = Timing(created_at=start, routed_at=start, dequeued_at=start, started_at=start, first_token_at=start,
               finished_at=end)
    return Result(id=job_id, status="ok", model="m", kind="chat", tenant="t", slo="standard", pool=pool,
                  worker=worker, timing=t, metrics=Metrics.of(t, tokens), slo_met=True)


def test_busy_cost_splits_a_worker_over_its_running_jobs() -> None:
    # Worker w1 ($3600/h = $1/s): job a alone for 1 s, then a and b together for 1 s, then b alone for 2 s.
    results = [_result("a", "w1", 0, 2), _result("b", "w1", 1, 4), _result("c", "w2", 0, 1), _result("d", "w1", 5, 5)]
    costs = busy_costs(results, {"gpu": 3600.0})
    assert costs == pytest.approx({"a": 1.5, "b": 2.5, "c": 1.0, "d": 0.0})
    assert busy_costs(results, {}) == {}


def test_report_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(BrokerError, match=re.escape("pip install 'inference-broker[report]'")):
        report.write([_result("a", "w", 0, 1)], tmp_path, load_config())


def test_report_rejects_a_bad_file_naming_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "x", "status": "ok", "model": "m", "kind": "chat", "tenant": "t"})
    bad.write_text(f"{good}\n\n{{not json\n")
    done = cli("report", "--input", str(bad), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert "line 3" in done.stderr and "results --export" in done.stderr and "Traceback" not in done.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    done = cli("report", "--input", str(empty), "--out", str(tmp_path / "out"))
    assert done.returncode == 1 and "no results to report on" in done.stderr


def test_report_of_jobs_that_never_ran(tmp_path: Path) -> None:
    """Rejected jobs have no timings: counted in the tables, noted under them, and nothing breaks."""
    shed = Result(id="r", status="rejected", model="m", kind="chat", tenant="t", error="slo_unattainable")
    index = report.write([_result("a", "w", 0, 1), shed], tmp_path, load_config(), "Mixed")
    page = index.read_text()
    assert "1 job(s) without timings" in page
    assert "<tr><td>rejected</td><td>1</td><td>50.0%</td>" in page


def test_report_counts_cancelled_jobs(tmp_path: Path) -> None:
    gone = Result(id="c", status="cancelled", model="m", kind="chat", tenant="t", error="cancelled by its producer")
    stats = group_stats("standard", [_result("a", "w", 0, 1), gone])
    assert stats.statuses["cancelled"] == 1 and stats.attainment == 0.5  # a cancel counts as a miss
    page = report.write([_result("a", "w", 0, 1), gone], tmp_path, load_config(), "Mixed").read_text()
    assert "<th>cancelled</th>" in page
