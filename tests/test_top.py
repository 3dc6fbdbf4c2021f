"""`inference-broker top` against a real stack: one frame with --once, and live in a pseudo-terminal.

One stack (policy worker, a gpu and an accel worker) and one short workload serve every
test here. The live test runs `top` on a pty, as a person's terminal would, waits for it to
redraw in place, then sends SIGINT and expects a clean exit.
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from rich.console import Console

from broker.client import Client
from broker.config import default_config_text, load_config
from broker.settings import Settings
from broker.wire import Result, json_encode
from cli.embedded import EmbeddedRedis
from cli.runstats import group_stats
from cli.top import Collector, PoolView, StreamView, TopState, WorkerView, render
from policies.config import config_from_dict
from tests.conftest import ROOT, Roles
from tests.helpers import mixed_jobs

CLI = [sys.executable, "-m", "cli"]


class Stack:
    def __init__(self, url: str, prefix: str, results: list[Result]) -> None:
        self.url, self.prefix, self.results = url, prefix, results

    @property
    def where(self) -> list[str]:
        return ["--redis-url", self.url, "--prefix", self.prefix]


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    roles = Roles(redis_server.url, prefix, tmp_path_factory.mktemp("roles"))
    env = {"IB_HEARTBEAT_S": "0.2"}
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", env=env)
    roles.start("worker", "--pool", "accel", env=env)
    jobs = mixed_jobs(40, seed=3, tag="top")

    async def run() -> list[Result]:
        async with Client(redis_server.url, prefix=prefix) as client:
            await client.submit_many(jobs)
            return list(await asyncio.gather(*(client.result(j.id, timeout=30) for j in jobs)))

    try:
        yield Stack(redis_server.url, prefix, asyncio.run(run()))
    finally:
        roles.stop_all()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "IB_PREFIX", "IB_CONFIG")}


def test_once_prints_a_frame_with_throughput_and_latency_per_class(stack: Stack) -> None:
    done = subprocess.run([*CLI, "top", "--once", *stack.where], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    rate = re.search(r"throughput \d+\.\d jobs/s last \d+ s, (\d+\.\d) over \d+ s", out)
    assert rate and float(rate.group(1)) > 0, out
    for slo in {r.slo for r in stack.results}:
        row = re.search(rf"│ {slo} +│ +(\d+) │.*│ +([\d.]+/[\d.]+ (?:ms|s)) │ +([\d.]+/[\d.]+ (?:ms|s)) │", out)
        assert row, f"no row with latencies for {slo}:\n{out}"
        assert int(row.group(1)) == sum(r.slo == slo for r in stack.results)
    assert re.search(r"│ gpu +│ +1 │", out) and re.search(r"│ accel +│ +1 │", out), out
    assert "│ jobs " in out and "│ policy " in out  # the ingress stream and its group
    assert "policy workers 1" in out and "dead letters 0" in out


def test_live_view_redraws_in_place_and_exits_cleanly_on_sigint(stack: Stack) -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([*CLI, "top", "--interval", "0.2", *stack.where], cwd=ROOT,
                            env={**_env(), "TERM": "xterm-256color", "COLUMNS": "130", "LINES": "60"},
                            stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    screen = b""
    try:
        deadline = time.monotonic() + 30
        # Wait for the first frame and two redraws (the cursor moves back up over the frame).
        while screen.count(b"Ctrl-C quits") < 3:
            assert time.monotonic() < deadline and proc.poll() is None, screen.decode(errors="replace")[-3000:]
            if select.select([controller], [], [], 0.5)[0]:
                screen += os.read(controller, 65536)
        text = screen.decode(errors="replace")
        assert "\x1b[" in text and re.search(r"\x1b\[\d*A", text), "no cursor movement: not refreshed in place"
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
        rate = re.search(r"throughput \d+\.\d jobs/s last \d+ s, (\d+\.\d) over \d+ s", plain)
        assert rate and float(rate.group(1)) > 0, plain[-3000:]
        assert re.search(r"interactive +│ +\d+ │.*[\d.]+/[\d.]+ m?s │", plain), plain[-3000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        while select.select([controller], [], [], 0.2)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            screen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    assert "Traceback" not in screen.decode(errors="replace")


def test_render_is_a_pure_function_of_the_state() -> None:
    state = TopState(
        at=0.0, where="redis://example:6379/0  prefix ib", window_s=60, span_s=30, recent=12, recent_s=10,
        pools=[PoolView("gpu", [WorkerView("w1", 12, 64, 0.3)], 1), PoolView("accel", [], 0)],
        streams=[StreamView("jobs", 5, "policy", 3, 2, 1.5, 1)],
        pool_share={"gpu": 30, "rejected": 3}, goals={"interactive": 0.9}, default_pool="gpu", dead=2,
        policies=1)
    console = Console(record=True, width=120)
    console.print(render(state))
    text = console.export_text()
    assert "throughput 1.2 jobs/s last 10 s, 1.1 over 30 s" in text  # 12 in the last 10 s, 33 over 30 s
    assert "1 (+1 stale)" in text and "12/64" in text and "(rejected)" in text
    assert "dead letters 2" in text and "1.5 s" in text
    assert "(no results yet)" in text


def test_cancelled_jobs_get_a_column_only_when_there_are_some() -> None:
    ok = Result(id="a", status="ok", model="m", kind="chat", tenant="t", slo="interactive")
    cancelled = Result.for_job(ok, "cancelled", slo="interactive")

    def text(results: list[Result]) -> str:
        state = TopState(at=0.0, where="redis://example:6379/0  prefix ib", window_s=60, span_s=30, recent=2,
                         recent_s=10, classes=[group_stats("interactive", results)])
        console = Console(record=True, width=140)
        console.print(render(state))
        return console.export_text()

    assert "cancelled" not in text([ok, ok])
    row = next(line for line in text([ok, cancelled]).splitlines() if "interactive" in line)
    assert "cancelled" in text([ok, cancelled])
    assert [cell.strip() for cell in row.split("│")][1:9] == ["interactive", "2", "0.1", "1", "0", "0", "0", "1"]


async def test_collector_reports_redis_away_in_the_frame() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        settings = Settings(redis_url="redis://:secret@127.0.0.1:1/0", prefix="nowhere")
        state = await Collector(client, settings, load_config()).collect()
    finally:
        await client.aclose()
    assert state.error and "unreachable" in state.error
    console = Console(record=True, width=120)
    console.print(render(state))
    text = console.export_text()
    assert "unreachable" in text and "secret" not in text


def test_top_needs_a_redis(tmp_path: Path) -> None:
    env = {**_env(), "XDG_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run([*CLI, "top", "--once"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no Redis configured" in done.stderr


async def test_the_frame_covers_every_tenants_ingress_and_results(client: aioredis.Redis, settings: Settings) -> None:
    config = config_from_dict({**tomllib.loads(default_config_text()), "tenants": {"acme": {}}})
    acme = settings.topology.of_tenant("acme")
    await client.xadd(acme.jobs, {"job": b"{}"})  # one job waiting on acme's ingress
    for space, job_id in ((settings.topology, "d1"), (acme, "a1"), (acme, "a2")):  # results in each space
        result = Result(id=job_id, status="ok", model="m", kind="chat", tenant=space.tenant or "default",
                        slo="standard")
        await client.xadd(space.reply("results"), {"result": json_encode(result)})
    frame = await Collector(client, settings, config).frame()
    ingress = {view.name: view.length for view in frame.streams if view.name.endswith("jobs")}
    assert ingress == {"jobs": 0, "~acme:jobs": 1}
    assert {c.name: c.jobs for c in frame.classes} == {"standard": 3}
