"""compose.yaml run for real: ``docker compose up --build``, the demo, a host-side submit, an
OpenAI-client request through the published gateway port, ``down``.

Selected on purpose (``pytest -m compose tests/test_compose_stack.py``; the plain suite
deselects it): it needs a Docker engine and the base images, and takes about a minute once
the image is built. Where no engine answers it skips with the reason, or fails with
``IB_REQUIRE_COMPOSE`` set (as ``.ci/run`` sets it, after ``deploy/standins.sh`` has
started Debian's engine and built local stand-ins for the base images).

Each run is its own compose project (a unique ``-p`` name), with Redis and the gateway
published on free ports of 127.0.0.1, so it shares nothing with a stack a developer has
running. The gateway gets an API key through compose's ``IB_GATEWAY_KEYS`` (its hash only).
Every wait is bounded; a failing step prints the tail of ``docker compose logs``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest
import redis

from broker.config import load_config
from broker.topology import Topology
from broker.wire import Result, decode_result
from cli.embedded import free_port
from gateway.keys import key_line
from tests.test_compose import COMPOSE_FILE, ROOT, SERVICES, _compose_cli

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

UP_S = 600  # a cold image build included (about 20 s here once the base images exist)
HEALTHY_S = 120
DEMO_S = 240  # the demo sends for about 24 s and waits up to 120 s for results
DOWN_S = 120  # the workers' stop_grace_period is 40 s
API_KEY = f"sk-compose-{uuid.uuid4().hex}"
"""The key the stack's gateway accepts (tenant ``compose``); only its hash enters the config."""
DEFAULT_SERVICES = {name for name, svc in SERVICES.items() if "profiles" not in svc}
"""What a plain ``docker compose up`` starts."""


def _docker(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def _engine_problem() -> str | None:
    """Why no stack can run here, or None."""
    cli = _compose_cli()
    if cli is None:
        return "no `docker compose` plugin or `docker-compose` binary on PATH"
    try:
        probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker info` failed: {exc}"
    if probe.returncode != 0:
        said = probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"]
        return f"no Docker engine answers ({said[-1]})"
    return None


class Stack:
    """One compose project of compose.yaml, driven by the compose CLI."""

    def __init__(self, cli: list[str]) -> None:
        self.project = f"ibtest{uuid.uuid4().hex[:10]}"
        self.redis_port, self.gateway_port = free_port(), free_port()
        self.cli = [*cli, "-f", str(COMPOSE_FILE), "-p", self.project]
        # The host's IB_* settings would leak into the containers through compose's ${...}.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IB_") and k != "REDIS_URL"}
        self.env.update(REDIS_PORT=str(self.redis_port), GATEWAY_PORT=str(self.gateway_port),
                        IB_GATEWAY_KEYS=key_line(API_KEY, "compose"), IB_GATEWAY_NO_AUTH="false")

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def compose(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.cli, *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=ROOT)

    def logs_tail(self, lines: int = 60) -> str:
        try:
            done = self.compose("logs", "--no-color", "--tail", str(lines), timeout=60)
            return done.stdout + done.stderr
        except subprocess.TimeoutExpired:
            return "(docker compose logs timed out)"

    @contextmanager
    def explained(self) -> Iterator[None]:
        """On a failure inside, print the services' last log lines (pytest shows them with it)."""
        try:
            yield
        except BaseException:
            print(f"--- docker compose logs --tail 60 ({self.project}) ---\n{self.logs_tail()}")
            raise

    def containers(self) -> list[dict[str, Any]]:
        """``docker inspect`` of every container of the project, stopped ones included."""
        ids = _docker("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={self.project}").split()
        return json.loads(_docker("inspect", *ids)) if ids else []

    def leftovers(self) -> dict[str, list[str]]:
        """The project's containers, networks and volumes that exist now."""
        label = f"label=com.docker.compose.project={self.project}"
        name = f"name={self.project}"  # names start <project>_ (or <project>- for v2's containers)
        found = {}
        for kind, listing in (("containers", ["ps", "-a"]), ("networks", ["network", "ls"]),
                              ("volumes", ["volume", "ls"])):
            fmt = "{{.Names}}" if kind == "containers" else "{{.Name}}"
            names = {n for flt in (label, name)
                     for n in _docker(*listing, "--filter", flt, "--format", fmt).split()}
            found[kind] = sorted(names)
        return found

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.compose("down", "--volumes", "--remove-orphans", timeout=DOWN_S)


def service_of(container: dict[str, Any]) -> str:
    return str(container["Config"]["Labels"]["com.docker.compose.service"])


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """compose.yaml's default services, up and built; taken down (volumes too) afterwards."""
    problem = _engine_problem()
    if problem:
        if os.environ.get("IB_REQUIRE_COMPOSE"):
            pytest.fail(f"IB_REQUIRE_COMPOSE is set but {problem}; `sudo deploy/standins.sh` starts an engine")
        pytest.skip(f"{problem}: `sudo deploy/standins.sh` starts Debian's engine with local base images")
    cli = _compose_cli()
    assert cli is not None
    stack = Stack(cli)
    try:
        with stack.explained():
            # Returns once the demo has started, i.e. once every role it depends on is healthy.
            up = stack.compose("up", "--detach", "--build", timeout=UP_S)
            assert up.returncode == 0, f"compose up failed:\n{up.stdout[-3000:]}{up.stderr[-3000:]}"
        yield stack
    finally:
        stack.down()


def test_every_service_comes_up_and_every_healthcheck_passes(stack: Stack) -> None:
    with stack.explained():
        deadline = time.monotonic() + HEALTHY_S
        while True:
            containers = stack.containers()
            checked = [c for c in containers if c["State"].get("Health")]
            health = {c["Name"].lstrip("/"): c["State"]["Health"]["Status"] for c in checked}
            assert "unhealthy" not in health.values(), health
            if checked and set(health.values()) == {"healthy"}:
                break
            assert time.monotonic() < deadline, f"not all healthy after {HEALTHY_S} s: {health}"
            time.sleep(1)
        services = [service_of(c) for c in containers]
        assert set(services) == DEFAULT_SERVICES, services
        assert services.count("worker-gpu") == SERVICES["worker-gpu"]["deploy"]["replicas"] == 2
        # Every long-running service is health-checked; only the one-shot demo is not.
        assert {service_of(c) for c in checked} == DEFAULT_SERVICES - {"demo"}
        # Published on loopback only, as the engine really bound them.
        bound = {(service_of(c), b["HostIp"], b["HostPort"]) for c in containers
                 for binds in (c["NetworkSettings"]["Ports"] or {}).values() for b in binds or []}
        assert {(svc, port) for svc, _, port in bound} == {
            ("redis", str(stack.redis_port)), ("gateway", str(stack.gateway_port))}, bound
        assert {ip for _, ip, _ in bound} == {"127.0.0.1"}, bound


def test_demo_sends_its_workload_through_the_roles_and_exits_0(stack: Stack) -> None:
    with stack.explained():
        demo = next(c for c in stack.containers() if service_of(c) == "demo")
        code = int(_docker("wait", demo["Id"], timeout=DEMO_S).strip())
        output = _docker("logs", demo["Id"])
        assert code == 0, output[-3000:]
        summary = re.search(r"(\d+) jobs in [\d.]+ s: (\d+) ok, (\d+) not ok", output)
        assert summary, output[-3000:]
        jobs, ok, not_ok = map(int, summary.groups())
        assert (jobs, ok, not_ok) == (600, 600, 0), summary.group(0)  # the demo's default workload
        assert "Results by SLO class and pool" in output


def test_host_side_submit_through_the_published_port(stack: Stack) -> None:
    with stack.explained():
        script = Path(sys.executable).with_name("inference-broker")  # the console script, as a user runs it
        env = {**stack.env, "NO_COLOR": "1"}
        done = subprocess.run([str(script), "submit", "--redis-url", stack.redis_url, "--prompt", "Hello from the host",
                               "--json", "--timeout", "60"], capture_output=True, text=True, timeout=90, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        result = msgspec.json.decode(done.stdout.strip().splitlines()[-1], type=Result)
        assert result.status == "ok" and result.output, result
        assert result.pool in load_config().pools
        # Run by a worker of this stack: consumer names carry the host name, a container's id.
        hosts = {c["Config"]["Hostname"] for c in stack.containers() if service_of(c).startswith("worker-")}
        assert result.worker and any(f"-{h}-" in result.worker for h in hosts), (result.worker, hosts)


def test_openai_client_through_the_published_gateway_port(stack: Stack) -> None:
    with stack.explained():
        base_url = f"http://127.0.0.1:{stack.gateway_port}/v1"
        api = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60)
        raw = api.chat.completions.with_raw_response.create(
            model="llama-3.1-8b", messages=[{"role": "user", "content": "Hello through compose"}], max_tokens=8)
        chat = raw.parse()
        assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens == 8
        assert raw.headers["x-ib-pool"] in load_config().pools
        # The job's tenant comes from the key, as the broker recorded it in the stack's Redis.
        job_id = raw.headers["x-ib-job-id"]
        with redis.Redis.from_url(stack.redis_url) as client:
            done = client.get(Topology("ib").of_job(job_id).done(job_id))
        assert done is not None and decode_result(done).tenant == "compose"
        # The key from the compose config is what let it in: another is refused.
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url, api_key="sk-not-the-key", max_retries=0, timeout=30).models.list()


def test_down_leaves_no_container_network_or_volume_behind(stack: Stack) -> None:
    with stack.explained():
        before = stack.leftovers()
        # The check below can fail: the stack has all three while it runs.
        assert all(before.values()), before
        assert f"{stack.project}_redis-data" in before["volumes"], before
        done = stack.down()
        assert done.returncode == 0, done.stdout + done.stderr
        after = stack.leftovers()
        assert after == {"containers": [], "networks": [], "volumes": []}, after
