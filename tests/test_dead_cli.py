"""`inference-broker dead`: list, replay and purge dead letters of a live stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import redis.asyncio as aioredis

from broker.client import Client
from broker.topology import Topology
from broker.wire import DeadLetter, Job, json_encode
from tests.conftest import FAST_ENV, ROOT, Roles
from tests.helpers import eventually


def cli(*args: str, url: str, prefix: str, stdin: str | None = None,
        columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IB_")}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "cli", *args, "--redis-url", url, "--prefix", prefix],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, input=stdin)


async def test_list_replay_and_purge(roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    roles.start("policy", env=FAST_ENV)
    drilled = roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    topo = Topology(prefix)
    failing = Job(id="fix-me", model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=3,
                  metadata={"fault": "permanent"})
    async with Client(redis_url, prefix=prefix) as sdk:
        assert (await sdk.run(failing, timeout=20)).status == "failed"
    await client.xadd(topo.jobs, {"job": b"not json"})

    async def two_letters() -> bool:
        return await client.xlen(topo.dead) == 2

    await eventually(two_letters, what="two dead letters")

    listed = cli("dead", "list", "--json", url=redis_url, prefix=prefix)
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(d["reason"] for d in letters) == ["backend_error", "decode_error"]
    table = cli("dead", "list", url=redis_url, prefix=prefix)
    assert "2 dead letter(s)" in table.stdout and "fix-me" in table.stdout

    # "Fix the backend": a worker without fault injection, then replay everything.
    drilled.terminate()
    assert drilled.wait(timeout=15) == 0
    roles.worker("gpu")
    replayed = cli("dead", "replay", "--all", url=redis_url, prefix=prefix)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 job(s), skipped 1" in replayed.stdout
    assert "no job to replay" in replayed.stderr

    async def fixed() -> bool:
        raw = await client.get(topo.done("fix-me"))
        return raw is not None and json.loads(raw)["status"] == "ok"

    await eventually(fixed, what="the replayed job to succeed")
    assert await client.xlen(topo.dead) == 1  # only the undecodable entry is left

    kept = cli("dead", "purge", url=redis_url, prefix=prefix, stdin="n\n")
    assert kept.returncode != 0 and await client.xlen(topo.dead) == 1
    purged = cli("dead", "purge", "--yes", url=redis_url, prefix=prefix)
    assert purged.returncode == 0 and "deleted 1 dead letter(s)" in purged.stdout
    assert await client.xlen(topo.dead) == 0


def test_replay_needs_ids_or_all(redis_url: str, prefix: str) -> None:
    done = cli("dead", "replay", url=redis_url, prefix=prefix)
    assert done.returncode == 2 and "--all" in done.stderr
    unknown = cli("dead", "replay", "1-1", url=redis_url, prefix=prefix)
    assert unknown.returncode == 2 and "no dead letter 1-1" in unknown.stderr


async def test_list_shows_job_text_as_text(redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    # Regression: the table parsed an error's `[...]` as rich markup and passed ESC and CSI
    # to the terminal. A backend's error (quoting the job) reaches a dead letter as it is.
    topo = Topology(prefix)
    letter = DeadLetter(reason="backend_error", error="model [bold]m[/bold] said \x1b[31mno\x9b2J\r!", stream=topo.jobs,
                        entry_id="1-1", payload=b"{}", job_id="j-1")
    await client.xadd(topo.dead, {"dead": json_encode(letter)})
    table = cli("dead", "list", url=redis_url, prefix=prefix)
    assert table.returncode == 0, table.stderr
    assert not [c for c in table.stdout if not c.isprintable() and c != "\n"], repr(table.stdout)
    assert "[bold]m[/bold]" in table.stdout and "\\x1b[31mno\\x9b2J" in table.stdout, table.stdout


async def test_list_keeps_ids_whole_at_80_columns(roles: Roles, redis_url: str, prefix: str,
                                                  client: aioredis.Redis) -> None:
    # At 80 columns (a pipe's width) the table folded entry and job ids mid-token.
    roles.start("policy", env=FAST_ENV)
    roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    job = Job(id="a7f3c2e9b14d4e6f8a0b2c4d6e8f0a1b-retry", model="llama-3.1-8b", kind="completion", prompt="p",
              max_tokens=3, metadata={"fault": "permanent"})
    async with Client(redis_url, prefix=prefix) as sdk:
        assert (await sdk.run(job, timeout=20)).status == "failed"
    await client.xadd(Topology(prefix).jobs, {"job": b"not json"})

    async def two_letters() -> bool:
        return await client.xlen(Topology(prefix).dead) == 2

    await eventually(two_letters, what="two dead letters")
    as_json = cli("dead", "list", "--json", url=redis_url, prefix=prefix)
    letters = [json.loads(line) for line in as_json.stdout.splitlines()]
    listed = cli("dead", "list", url=redis_url, prefix=prefix, columns=80)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    for letter in letters:
        # The entry id, its reason and the job id whole on one line, ready to copy into `dead replay`.
        head = next(line for line in lines if letter["dead_entry_id"] in line.split())
        assert letter["reason"] in head.split() and (letter["job_id"] or "-") in head.split()
    # The id that --json gives is the one `dead replay` takes (it gave the source entry's id).
    failed = next(letter for letter in letters if letter["reason"] == "backend_error")
    replayed = cli("dead", "replay", failed["dead_entry_id"], url=redis_url, prefix=prefix)
    assert replayed.returncode == 0 and "replayed 1 job(s)" in replayed.stdout, replayed.stderr
