"""Structured logs: JSON lines with job and trace context, and no credentials anywhere.

Roles run against a password-protected redis-server and go through error paths (a job
that fails for good, one that is retried until it is dead-lettered, Redis killed and
restarted, a wrong password); the password must appear in no log line, no error and no
health answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from broker.client import Client
from broker.logs import JsonFormatter, TextFormatter, job_context, scrub
from broker.topology import Topology
from broker.wire import Job, decode_dead
from cli.embedded import EmbeddedRedis, free_port
from tests.conftest import FAST_ENV, ROOT, Roles, _start
from tests.helpers import eventually
from tests.test_metrics import get, is_ready

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_scrub_masks_passwords_in_urls_queries_and_auth() -> None:
    assert scrub("redis://:hunter2@db:6379/0") == "redis://:***@db:6379/0"
    assert scrub("rediss://app:hunter2@db/0 and redis://db:6379") == "rediss://app:***@db/0 and redis://db:6379"
    assert scrub("unix:///run/redis.sock?password=hunter2&db=0") == "unix:///run/redis.sock?password=***&db=0"
    assert scrub("Command # 1 (AUTH app hunter2) failed") == "Command # 1 (AUTH ***) failed"
    assert scrub("job j-1 failed: timeout") == "job j-1 failed: timeout"


def test_formatters_carry_job_and_trace_context_and_scrub() -> None:
    job = Job(id="j-1", model="m", prompt="p", kind="completion", metadata={"traceparent": TRACEPARENT})
    record = logging.LogRecord("inference_broker.worker", logging.WARNING, __file__, 1,
                               "job %s failed on redis://:hunter2@db", ("j-1",), None)
    record.__dict__.update(job_context(job))
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING" and line["logger"] == "inference_broker.worker"
    assert line["msg"] == "job j-1 failed on redis://:***@db"
    assert line["job_id"] == "j-1" and line["trace_id"] == TRACE_ID and line["span_id"] == "00f067aa0ba902b7"
    assert line["ts"].endswith("Z")
    text = TextFormatter().format(record)
    assert "hunter2" not in text and text.endswith(f"trace_id={TRACE_ID}")
    assert job_context(None, "j-2") == {"job_id": "j-2"} and job_context(None) == {}


FORGED = "2026-01-01 00:00:00,000 WARNING inference_broker.policy: forged"
EVIL = f"\n{FORGED}\r\x1b[31m\x9b31m\u2028{FORGED}\x00"
"""Job data that, written raw, starts a log line of its own and sends terminal escapes (C0 and C1)."""
RECORD = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) inference_broker[\w.]*: ")
"""The start of a text log record (TEXT_FORMAT)."""


def _raw_controls(text: str) -> list[str]:
    return sorted({c for c in text if not c.isprintable() and c != "\n"})


def test_formatters_escape_control_characters_in_messages_arguments_and_tracebacks() -> None:
    try:
        raise ValueError(f"bad{EVIL}")
    except ValueError:
        record = logging.LogRecord("inference_broker.policy", logging.WARNING, __file__, 1,
                                   f"entry{EVIL} %s", (f"field{EVIL}",), exc_info=sys.exc_info())
    record.__dict__.update(job_context(None, f"j{EVIL}"))
    text = TextFormatter().format(record)
    assert not _raw_controls(text), _raw_controls(text)
    first, *rest = text.split("\n")
    assert RECORD.match(first) and "\\n2026-01-01" in first and "\\x1b[31m\\x9b31m\\u2028" in first
    # The traceback keeps its lines, each indented: none can pass for a record of its own.
    assert rest and all(line.startswith("    ") for line in rest), text
    assert "    ValueError: bad" in rest and f"    {FORGED}\\r\\x1b[31m\\x9b31m\\u2028{FORGED}\\x00" in rest
    line = JsonFormatter().format(record)
    assert "\n" not in line and not _raw_controls(line)
    out = json.loads(line)
    assert all(value.isprintable() for key, value in out.items() if key != "exc")
    assert not _raw_controls(out["exc"]) and f"ValueError: bad\n{FORGED}\\r\\x1b[31m" in out["exc"]


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_job_data_cannot_forge_log_lines_or_send_terminal_escapes(roles: Roles, client: aioredis.Redis,
                                                                         prefix: str, fmt: str) -> None:
    # Regression: an unknown field's name, an entry's field names, a bad `kind` went into
    # the policy worker's dead-letter warning raw: a newline forged a record, ESC and CSI
    # (C1, which JSON leaves as is) reached the operator's terminal.
    topo = Topology(prefix)
    good = {"id": "fine", "model": "llama-3.1-8b", "kind": "completion", "prompt": "p"}
    entries: list[dict[str, bytes]] = [
        {"job": json.dumps({**good, "id": "json-field", f"zz{EVIL}": 1}).encode()},
        {"job": msgspec.msgpack.encode({**good, "id": "msgpack-field", f"zz{EVIL}": 1})},
        {f"x{EVIL}": b"{}", f"y{EVIL}": b"1"},
        {"job": json.dumps({**good, "id": "kind", "kind": f"k{EVIL}"}).encode()},
        {"job": json.dumps({**good, "id": "model", "model": f"m\n{FORGED}\r\x1b[31m\x9b"}).encode()},
        {"job": json.dumps({**good, "id": f"i{EVIL}"}).encode()},
        {"job": json.dumps({**good, "id": "reply", "reply_to": f"r{EVIL}"}).encode()},
    ]
    ids = [(await client.xadd(topo.jobs, fields)).decode() for fields in entries]  # type: ignore[arg-type]
    policy = roles.start("policy", env={**FAST_ENV, "IB_LOG_FORMAT": fmt})

    async def all_dead() -> bool:
        return len(await client.xrange(topo.dead)) == len(entries)

    await eventually(all_dead, timeout=20, what="a dead letter per crafted entry")
    assert roles.stop_all() == [0] and policy.returncode == 0
    output = (roles.log_dir / "policy-0.log").read_bytes().decode()  # not read_text: it turns \r into \n
    assert not _raw_controls(output), _raw_controls(output)
    lines = output.removesuffix("\n").split("\n")
    if fmt == "json":
        messages = [json.loads(line)["msg"] for line in lines]
    else:
        assert all(RECORD.match(line) for line in lines), output
        messages = lines
    assert not [line for line in lines if line.startswith(FORGED) or line.startswith("{") != (fmt == "json")]
    for entry_id in ids:  # one record per dead letter, with the crafted text escaped in it
        assert len([m for m in messages if f"dead letter {entry_id} " in m]) == 1, output
    assert "forged" in output and all("dead letter" in m for m in messages if "forged" in m), output
    # Dead letters quote the same text escaped: `inference-broker dead list` prints them.
    letters = [decode_dead(f[b"dead"]) for _id, f in await client.xrange(topo.dead)]
    assert all(letter.error.isprintable() for letter in letters), [d.error for d in letters]


async def test_no_credentials_in_any_log_line_or_error(servers: list[EmbeddedRedis], prefix: str,
                                                     tmp_path: Path) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    auth = ("--requirepass", secret)
    server = _start(directory=tmp_path / "data", port=free_port(), extra_args=auth)
    servers.append(server)
    url = f"redis://:{secret}@127.0.0.1:{server.port}/0"
    logs = tmp_path / "logs"
    logs.mkdir()
    roles = Roles(url, prefix, logs)
    env = {**FAST_ENV, "IB_LOG_FORMAT": "json"}
    ports = [free_port(), free_port()]
    procs = [roles.start("policy", "--metrics-port", str(ports[0]), env=env),
             roles.start("worker", "--pool", "gpu", "--metrics-port", str(ports[1]), env=env)]
    answers: list[str] = []
    try:
        for port in ports:
            await eventually(lambda port=port: is_ready(port), timeout=20, what="the roles to be ready")

        def job(job_id: str, **metadata: str) -> Job:
            return Job(id=job_id, model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=4,
                       metadata={"traceparent": TRACEPARENT, **metadata})

        async with Client(url, prefix=prefix) as sdk:
            await sdk.submit_many([job("fine"), job("poison", fault="permanent"), job("flaky", fault="transient")])
            got = {i: (await sdk.result(i, timeout=30)).status for i in ("fine", "poison", "flaky")}
        assert got == {"fine": "ok", "poison": "failed", "flaky": "failed"}

        # Redis goes away and comes back: the roles log the outage and reconnect with the password.
        server.kill()
        await eventually(lambda: _answer(ports[1], answers, 503), timeout=10, what="not ready")
        back = EmbeddedRedis(port=server.port, directory=server.directory, extra_args=auth)
        servers.append(back)
        await asyncio.to_thread(back.start)
        for port in ports:
            await eventually(lambda port=port: _answer(port, answers, 200), timeout=20, what="ready again")
        async with Client(url, prefix=prefix) as sdk:
            assert (await sdk.run(job("after"), timeout=30)).status == "ok"
    finally:
        roles.stop_all()
    assert all(p.returncode == 0 for p in procs), roles.logs()

    # A wrong password: the role stops at once and says why, without either password.
    wrong = f"wrong-{uuid.uuid4().hex}"
    bad_url = f"redis://:{wrong}@127.0.0.1:{server.port}/0"
    refused = subprocess.run([sys.executable, "-m", "cli", "policy", "--redis-url", bad_url, "--prefix", prefix,
                              "--log-format", "json"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert refused.returncode == 1 and "refused the credentials" in refused.stderr, refused.stderr
    health = subprocess.run([sys.executable, "-m", "cli", "health", "--redis-url", bad_url],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert health.returncode != 0

    output = "\n".join(p.read_text() for p in sorted(logs.glob("*.log")))
    everything = "\n".join([output, *answers, refused.stdout, refused.stderr, health.stdout, health.stderr])
    assert secret not in everything and wrong not in everything
    assert "***@127.0.0.1" in refused.stderr  # the URL is shown, masked

    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is JSON
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    about = {line["job_id"]: line for line in lines if line.get("job_id")}
    assert {"poison", "flaky"} <= about.keys()
    assert about["poison"]["trace_id"] == TRACE_ID and "dead letter" in about["poison"]["msg"]
    outage = [line for line in lines if "is not ready: Redis unreachable" in line["msg"]]
    assert outage and all(line["level"] == "WARNING" for line in outage), "\n".join(line["msg"] for line in lines)


async def _answer(port: int, answers: list[str], want: int) -> bool:
    try:
        status, body = await asyncio.to_thread(get, port, "/readyz")
    except OSError:
        return False
    answers.append(body)
    return status == want
