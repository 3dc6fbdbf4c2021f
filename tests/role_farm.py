"""Start real roles and SIGKILL each once it has sent its first heartbeat, many times over.

``python -m tests.role_farm URL PREFIX COUNT`` (with the roles' ``IB_*`` settings in the
environment). One process imports the broker once and forks every role from it: a fresh
interpreter per role costs about a second of CPU on the test machines, a fork a few
milliseconds. Each child runs a real role entry point (every tenth a policy worker, the
others gpu pool workers) until its heartbeat is in Redis; then it is killed with SIGKILL,
so it removes nothing. Prints the heartbeat field of each killed role, one a line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import redis
import uvloop  # noqa: F401 - imported once here, not in every child

import workers.factory  # noqa: F401 - as above (serve_worker imports them when it starts)
import workers.worker  # noqa: F401
from broker.process import die_with_parent
from broker.settings import Settings
from cli.roles import run, serve_policy, serve_worker

TIMEOUT_S = 15.0
"""Longest a role may take to send its first heartbeat."""


def role(settings: Settings, policy: bool) -> None:
    """The child: one role, until it is killed."""
    die_with_parent()  # should this farm die first

    async def main(stop: asyncio.Event) -> None:
        if policy:
            await serve_policy(settings, stop)
        else:
            await serve_worker(settings, stop, "gpu", concurrency=1)

    run(main)


def first_beat(client: redis.Redis, key: str, pid: int) -> bytes:
    """The heartbeat field of the role with process id ``pid`` (its consumer name holds the pid)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for name in client.hkeys(key):
            if f"-{pid}-".encode() in name:
                return bytes(name)
        time.sleep(0.005)
    raise SystemExit(f"role {pid} sent no heartbeat to {key} within {TIMEOUT_S} s")


def main() -> None:
    url, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = Settings.from_env(redis_url=url, prefix=prefix)
    topo = settings.topology
    client = redis.Redis.from_url(url)
    for i in range(count):
        policy = i % 10 == 9
        pid = os.fork()
        if pid == 0:
            try:
                role(settings, policy)
            finally:
                os._exit(0)
        try:
            name = first_beat(client, topo.policy_heartbeats if policy else topo.heartbeats("gpu"), pid)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        print(name.decode(), flush=True)


if __name__ == "__main__":
    main()
