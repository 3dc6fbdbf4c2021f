"""The processes behind bench/gateway.py: a policy worker, one pool worker and a gateway."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import redis.asyncio as aioredis

from bench.harness import BenchError, Procs
from broker.topology import Topology
from broker.wire import Result, decode_result
from cli.embedded import free_port
from cli.stack import wait_for_roles
from gateway.keys import key_line

KEY = "sk-bench-0123456789abcdef"
"""The benchmark's API key (tenant ``bench``): the gateway checks it on every request, as in production."""


class GatewayStack:
    """Started on enter, once every role sends heartbeats and the gateway's /readyz answers."""

    def __init__(self, procs: Procs, url: str, prefix: str, config: Path, pool: str) -> None:
        self.procs, self.url, self.prefix, self.config, self.pool = procs, url, prefix, config, pool
        self.port = free_port()
        self.gateway_url = f"http://127.0.0.1:{self.port}"
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def gateway(self) -> subprocess.Popen[bytes]:
        return self.started["gateway"]

    def _spawn(self, name: str, *argv: str, env: dict[str, str] | None = None) -> None:
        common = ["--redis-url", self.url, "--prefix", self.prefix, "--config", str(self.config),
                  "--log-level", "WARNING"]
        argv = (sys.executable, "-m", "cli", *argv, *common)
        self.started[name] = self.procs.spawn(f"{self.prefix}-{name}", argv, env)

    def _check_alive(self) -> None:
        for name, proc in self.started.items():
            if proc.poll() is not None:
                raise BenchError(f"the {name} exited with status {proc.returncode}:\n"
                                 f"{self.procs.log_tail(f'{self.prefix}-{name}')}")

    def __enter__(self) -> GatewayStack:
        self._spawn("policy", "policy")
        self._spawn("worker", "worker", "--pool", self.pool)
        self._spawn("gateway", "gateway", "--port", str(self.port),
                    env={"IB_GATEWAY_KEYS": key_line(KEY, "bench")})
        try:
            wait_for_roles(self.url, Topology(self.prefix), {self.pool: 1}, timeout=60, check=self._check_alive)
            deadline = time.monotonic() + 30
            while not self._ready():
                self._check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"the gateway's /readyz did not answer within 30 s:\n"
                                     f"{self.procs.log_tail(f'{self.prefix}-gateway')}")
                time.sleep(0.1)
        except BaseException:
            self.procs.stop(list(self.started.values()))
            raise
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.gateway_url}/readyz", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.procs.stop(list(self.started.values()))

    async def results(self, job_ids: list[str]) -> dict[str, Result]:
        """The results of ``job_ids`` that exist (read from their done keys, on their shards)."""
        topo = Topology(self.prefix)
        client = aioredis.Redis.from_url(self.url)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.get(topo.of_job(job_id).done(job_id))
                raw = await pipe.execute()
        finally:
            await client.aclose()
        return {job_id: decode_result(value) for job_id, value in zip(job_ids, raw, strict=True) if value}
