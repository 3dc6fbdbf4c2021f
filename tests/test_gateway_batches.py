"""The OpenAI Batch API, end to end: the official ``openai`` client against ``python -m cli gateway``
and real roles, on a real Redis (and a 3-primary cluster for the round trip).

Each line of a batch runs as a job of the ``batch`` class under the id ``<batch id>.<line>``;
outcomes are checked in the output and error files the client downloads, and against the
broker's own record of each job (its routed entry, its one result).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from openai import AsyncOpenAI
from openai.types import Batch

from broker.client import Client
from broker.config import load_config
from broker.topology import Topology
from broker.wire import Job, decode_result, decode_routed
from gateway.batches import BatchApi
from gateway.batchfile import parse
from gateway.batchsettings import BatchSettings
from gateway.context import Gateway
from gateway.ledger import Batch as Record
from gateway.ledger import RequestCounts, Stored
from tests.conftest import ROOT, Roles
from tests.deployments import ON_BOTH, streams, xlen_all, xrange_all
from tests.gateway_proc import KEY, OTHER_KEY, GatewayProc, start_gateway
from tests.helpers import eventually, lane, warm_up

FINAL = ("completed", "failed", "expired", "cancelled")
DEFAULT_POLICY = (ROOT / "broker" / "default.toml").read_text()
CHAT: Literal["/v1/chat/completions"] = "/v1/chat/completions"


def request(custom_id: str, model: str = "llama-3.1-8b", text: str = "hello") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


class Gateways:
    """Gateways of the test's deployment (tests/gateway_proc.py) sharing one files directory, and their clients."""

    def __init__(self, roles: Roles, tmp_path: Path) -> None:
        self.roles = roles
        self.tmp_path = tmp_path
        self.clients: list[AsyncOpenAI] = []

    async def start(self, **env: str) -> GatewayProc:
        return await start_gateway(self.roles, self.tmp_path, env={
            "IB_GATEWAY_FILES_DIR": str(self.tmp_path / "files"), "IB_GATEWAY_BATCH_POLL_S": "0.1",
            "IB_GATEWAY_BATCH_LEASE_S": "1", **env})

    def client(self, gateway: GatewayProc, key: str = KEY) -> AsyncOpenAI:
        made = gateway.openai(key, timeout=10)
        self.clients.append(made)
        return made


@pytest_asyncio.fixture
async def gateways(roles: Roles, tmp_path: Path) -> AsyncIterator[Gateways]:
    made = Gateways(roles, tmp_path)
    yield made
    for client in made.clients:
        await client.close()


async def final(ai: AsyncOpenAI, batch_id: str, timeout: float = 30) -> Batch:
    """The batch once it is final (polled, as a client would)."""
    seen: list[Batch] = []

    async def is_final() -> bool:
        seen.append(await ai.batches.retrieve(batch_id))
        return seen[-1].status in FINAL

    await eventually(is_final, timeout=timeout, what=f"batch {batch_id} to be final")
    return seen[-1]


async def lines_of(ai: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await ai.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


async def results_per_job(client: aioredis.Redis, topo: Topology) -> Counter[str]:
    """Results on the batch reply stream of every shard, counted per job id."""
    entries = await xrange_all(client, [shard.reply("batches") for shard in topo.every_shard])
    return Counter(decode_result(fields[b"result"]).id for _, fields in entries)


@ON_BOTH
async def test_a_batch_runs_to_completed_with_output_and_error_files(
        roles: Roles, gateways: Gateways, client: aioredis.Redis, topo: Topology) -> None:
    roles.policy()
    roles.worker("gpu")
    gateway = await gateways.start()
    ai = gateways.client(gateway)
    lines = [request(f"r{i}", text=f"question {i}") for i in range(4)] + [request("unknown", model="no-such-model")]
    data = jsonl(lines)

    uploaded = await ai.files.create(file=("input.jsonl", data), purpose="batch")
    assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("batch", len(data), "input.jsonl")
    created = await ai.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h",
                                      metadata={"run": "round-trip"})
    assert created.status == "validating" and created.request_counts is not None
    assert created.request_counts.total == 5 and created.metadata == {"run": "round-trip"}
    assert created.expires_at == created.created_at + 86_400  # the completion window

    done = await final(ai, created.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 4, 1)
    assert done.in_progress_at is not None and done.finalizing_at is not None and done.completed_at is not None
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at

    output = await lines_of(ai, done.output_file_id)
    assert [line["custom_id"] for line in output] == ["r0", "r1", "r2", "r3"]  # input order, ids kept
    for line in output:
        response = line["response"]
        assert line["error"] is None and response["status_code"] == 200
        assert response["body"]["object"] == "chat.completion" and response["body"]["choices"][0]["message"]["content"]
        assert response["body"]["broker"]["slo"] == "batch" and response["body"]["service_tier"] == "flex"
        assert response["request_id"] == f"{created.id}.{line['custom_id'][1:]}"  # the job id: batch + line
    (error,) = await lines_of(ai, done.error_file_id)
    assert error["custom_id"] == "unknown" and error["response"]["status_code"] == 404
    assert error["response"]["body"]["error"]["code"] == "model_not_found"  # as the online API answers it

    assert (await ai.files.retrieve(done.output_file_id or "")).purpose == "batch_output"
    listed = [batch.id async for batch in ai.batches.list()]
    assert created.id in listed
    # One result per job that ran; the unknown model's line never became a job.
    assert await results_per_job(client, topo) == Counter({f"{created.id}.{i}": 1 for i in range(4)})
    samples = ('inference_broker_gateway_batches_total{status="completed"} 1.0',
               'inference_broker_gateway_batch_requests_total{file="output"} 4.0',
               'inference_broker_gateway_batch_requests_total{file="error"} 1.0',
               "inference_broker_gateway_batches_running 0.0")

    async def counted() -> bool:  # the runner counts its end just after it records it
        async with httpx.AsyncClient() as http:
            exposed = (await http.get(f"{gateway.url}/metrics")).text
        return all(sample in exposed for sample in samples)

    await eventually(counted, timeout=10, what=f"the gateway's /metrics to show {samples}")


@ON_BOTH
async def test_cancel_ends_a_batch_whose_jobs_cannot_start(
        roles: Roles, gateways: Gateways, client: aioredis.Redis, topo: Topology) -> None:
    roles.policy()  # and no pool worker: the batch's jobs wait in the gpu pool's batch lane
    ai = gateways.client(await gateways.start())
    uploaded = await ai.files.create(file=("input.jsonl", jsonl([request(f"c{i}") for i in range(3)])),
                                     purpose="batch")
    created = await ai.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    batch_lanes = streams(topo, lambda shard: lane(shard, "gpu", "batch"))

    async def routed() -> bool:
        return await xlen_all(client, batch_lanes) == 3

    await eventually(routed, what="the batch's jobs in the gpu pool's batch lane")
    for _, fields in await xrange_all(client, batch_lanes):
        job = decode_routed(fields[b"routed"]).job
        assert job.slo == "batch" and job.tenant == "acme" and job.deadline == created.expires_at

    cancelling = await ai.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = await final(ai, created.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (0, 3)
    assert done.output_file_id is None
    errors = await lines_of(ai, done.error_file_id)
    assert [line["custom_id"] for line in errors] == ["c0", "c1", "c2"]
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    # Each job's one outcome is ``cancelled``, in its done key and once on the reply stream.
    for i in range(3):
        job_id = f"{created.id}.{i}"
        raw = await client.get(topo.of_job(job_id).done(job_id))
        assert raw is not None and decode_result(raw).status == "cancelled"
    assert set((await results_per_job(client, topo)).values()) == {1}
    with pytest.raises(openai.ConflictError):  # a final batch stays as it is
        await ai.batches.cancel(created.id)


async def test_a_batch_survives_a_gateway_killed_mid_batch(
        roles: Roles, gateways: Gateways, client: aioredis.Redis, topo: Topology) -> None:
    roles.policy()  # no worker yet: the jobs are in flight when the gateway dies
    first = await gateways.start()
    ai = gateways.client(first)
    uploaded = await ai.files.create(file=("input.jsonl", jsonl([request(f"k{i}") for i in range(4)])),
                                     purpose="batch")
    created = await ai.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")

    async def routed() -> bool:
        return bool(await client.xlen(lane(topo, "gpu", "batch")) == 4)

    await eventually(routed, what="the batch's jobs routed")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    roles.worker("gpu")  # the jobs run and their results wait, unread, for the gateways' group

    async def ran() -> bool:
        return sum((await results_per_job(client, topo)).values()) == 4

    await eventually(ran, what="the batch's jobs to run while no gateway is up")
    ai = gateways.client(await gateways.start())
    done = await final(ai, created.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 0)
    output = await lines_of(ai, done.output_file_id)
    assert [line["custom_id"] for line in output] == ["k0", "k1", "k2", "k3"]  # each once, in order
    assert set((await results_per_job(client, topo)).values()) == {1}  # resubmitted, run once


async def test_of_two_gateways_one_runs_each_batch_and_both_answer_for_it(
        roles: Roles, gateways: Gateways, client: aioredis.Redis, topo: Topology) -> None:
    roles.policy()
    roles.worker("gpu")
    one, other = gateways.client(await gateways.start()), gateways.client(await gateways.start())
    uploaded = await one.files.create(file=("input.jsonl", jsonl([request(f"t{i}") for i in range(6)])),
                                      purpose="batch")
    created = await other.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    done = await final(one, created.id)  # every result reaches the one runner, whichever gateway reads it
    assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 6
    assert (await other.batches.retrieve(created.id)).output_file_id == done.output_file_id
    assert [line["custom_id"] for line in await lines_of(other, done.output_file_id)] == [f"t{i}" for i in range(6)]
    assert set((await results_per_job(client, topo)).values()) == {1}
    outputs = [f for f in (await one.files.list()).data if f.purpose == "batch_output"]
    assert len(outputs) == 1  # one runner wrote the files, once


async def test_another_gateway_takes_over_the_batches_when_the_one_running_them_dies(
        roles: Roles, gateways: Gateways, client: aioredis.Redis, topo: Topology) -> None:
    roles.policy()  # no worker yet: the jobs are in flight when their gateway dies
    first = await gateways.start()

    async def leads() -> bool:
        return bool(await client.exists(f"{topo.home}:batches-lease"))

    await eventually(leads, what="the first gateway to take the batch lease")
    second = await gateways.start()  # serves the API, runs no batch while the first holds the lease
    ai = gateways.client(second)
    uploaded = await ai.files.create(file=("input.jsonl", jsonl([request(f"f{i}") for i in range(3)])),
                                     purpose="batch")
    created = await ai.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")

    async def routed() -> bool:  # submitted by the first gateway, which runs the batches
        return bool(await client.xlen(lane(topo, "gpu", "batch")) == 3)

    await eventually(routed, what="the batch's jobs routed")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    roles.worker("gpu")
    done = await final(ai, created.id)
    assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 3
    assert [line["custom_id"] for line in await lines_of(ai, done.output_file_id)] == ["f0", "f1", "f2"]
    assert set((await results_per_job(client, topo)).values()) == {1}


async def test_uploads_and_batches_are_checked_and_kept_within_limits(gateways: Gateways) -> None:
    gateway = await gateways.start(IB_GATEWAY_MAX_FILE_BYTES="2000", IB_GATEWAY_MAX_TENANT_BYTES="2500",
                                   IB_GATEWAY_BATCH_MAX_ACTIVE="1")
    alice, bob = gateways.client(gateway), gateways.client(gateway, OTHER_KEY)
    good = jsonl([request(f"g{i}") for i in range(8)])
    assert 1000 < len(good) <= 1500

    with pytest.raises(openai.APIStatusError) as too_large:
        await alice.files.create(file=("big.jsonl", jsonl([request(f"b{i}") for i in range(20)])), purpose="batch")
    assert too_large.value.status_code == 413 and "limit" in too_large.value.message

    bad_files = {
        "used twice": jsonl([request("same"), request("same")]),
        "method 'GET'": jsonl([{**request("m"), "method": "GET"}]),
        "url '/v1/images'": jsonl([{**request("u"), "url": "/v1/images"}]),
        "messages": jsonl([{**request("e"), "body": {"model": "llama-3.1-8b"}}]),  # what to_job refuses
        "not a batch request": b'{"custom_id": "x"\n',
    }
    for problem, data in bad_files.items():
        with pytest.raises(openai.BadRequestError) as refused:
            await alice.files.create(file=("bad.jsonl", data), purpose="batch")
        assert problem in refused.value.message and "line" in refused.value.message, refused.value.message
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await alice.files.create(file=("in.jsonl", good), purpose="fine-tune")

    await alice.files.create(file=("one.jsonl", good), purpose="batch")
    with pytest.raises(openai.APIStatusError) as over_total:  # acme's two files would pass 2500 bytes
        await alice.files.create(file=("two.jsonl", good), purpose="batch")
    assert over_total.value.status_code == 413 and "delete" in over_total.value.message
    await bob.files.create(file=("one.jsonl", good), purpose="batch")  # a limit per tenant

    uploaded = (await alice.files.list()).data[0]
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        await alice.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="1h")  # type: ignore[arg-type]
    mismatched = await alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                            completion_window="24h")
    assert mismatched.status == "failed" and mismatched.errors is not None and mismatched.errors.data
    assert mismatched.errors.data[0].code == "mismatched_endpoint" and mismatched.errors.data[0].line == 1
    await alice.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.RateLimitError, match="not final yet"):  # one live batch per tenant here
        await alice.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")


async def test_a_tenant_sees_none_of_another_tenants_batches_or_files(gateways: Gateways) -> None:
    gateway = await gateways.start()
    alice, bob = gateways.client(gateway), gateways.client(gateway, OTHER_KEY)
    uploaded = await alice.files.create(file=("a.jsonl", jsonl([request("a0")])), purpose="batch")
    batch = await alice.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")

    attempts: dict[str, Callable[[], Any]] = {
        "retrieve the batch": lambda: bob.batches.retrieve(batch.id),
        "cancel the batch": lambda: bob.batches.cancel(batch.id),
        "retrieve the file": lambda: bob.files.retrieve(uploaded.id),
        "read the file": lambda: bob.files.content(uploaded.id),
        "delete the file": lambda: bob.files.delete(uploaded.id),
        "batch the file": lambda: bob.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                                      completion_window="24h"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(openai.NotFoundError):  # as if it did not exist: nothing tells that it does
            await attempt()
        assert what
    assert [b async for b in bob.batches.list()] == [] and (await bob.files.list()).data == []
    assert (await alice.batches.retrieve(batch.id)).id == batch.id  # still there for its owner
    # The owner's list, newest first, a page at a time (the client follows `after` itself).
    newer = await alice.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    page = await alice.batches.list(limit=1)
    assert [b.id for b in page.data] == [newer.id] and page.has_more
    assert [b.id async for b in alice.batches.list(limit=1)] == [newer.id, batch.id]
    assert (await alice.files.content(uploaded.id)).content.startswith(b'{"custom_id": "a0"')


def documented(fence: str) -> str:
    """The first ``fence`` code block (e.g. ``python``) of docs/gateway.md's Batch API section."""
    section = (ROOT / "docs" / "gateway.md").read_text().split("\n## Batch API\n", 1)[1]
    return section.split(f"```{fence}\n", 1)[1].split("```", 1)[0]


async def test_the_documented_batch_examples_run_as_written(roles: Roles, gateways: Gateways, tmp_path: Path) -> None:
    missing = [tool for tool in ("curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the curl example needs {' and '.join(missing)}")
    roles.policy()
    roles.worker("gpu")
    gateway = await gateways.start()
    (tmp_path / "requests.jsonl").write_text(documented("jsonl"))
    env = {**os.environ, "OPENAI_BASE_URL": f"{gateway.url}/v1", "OPENAI_API_KEY": KEY}

    python = subprocess.run([sys.executable, "-c", documented("python")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert python.returncode == 0, python.stderr
    assert python.stdout.startswith("completed") and '"custom_id":"q2"' in python.stdout, python.stdout
    shell = subprocess.run(["bash", "-euo", "pipefail", "-c", documented("sh")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0, shell.stderr
    output = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in output] == ["q1", "q2"] and " completed\n" in shell.stdout


def test_the_docs_list_every_error_code_of_the_batch_api() -> None:
    section = (ROOT / "docs" / "gateway.md").read_text().split("\n## Batch API\n", 1)[1]
    modules = ("batches.py", "batchroutes.py", "uploads.py", "runner.py")
    source = "".join((ROOT / "gateway" / name).read_text() for name in modules)
    codes = set(re.findall(r'code="([a-z_]+)"', source)) | set(re.findall(r'fail\(stored, "([a-z_]+)"', source))
    assert codes >= {"invalid_file", "mismatched_endpoint", "too_many_batches"}
    assert not sorted(code for code in codes if f"`{code}`" not in section)


class InProcess:
    """The Batch API without HTTP, on the test's deployment: for what a client cannot set (a short
    window, a tiny backlog). Batches are made as ``POST /v1/batches`` makes them."""

    def __init__(self, redis_url: str, prefix: str, tmp_path: Path, **client: Any) -> None:
        self.sdk = Client(redis_url, prefix=prefix, **client)
        settings = BatchSettings(files_dir=tmp_path / "files", batch_poll_s=0.05, batch_drain_s=5)
        self.api = BatchApi(Gateway(self.sdk, config=load_config()), settings)

    async def launch(self, lines: list[dict[str, Any]], window_s: int) -> str:
        data = jsonl(lines)
        uploaded = await self.api.store.put("acme", "in.jsonl", "batch", data)
        now = int(time.time())
        batch = Record(id=f"batch_{uuid.uuid4().hex}", endpoint=CHAT, input_file_id=uploaded.id, status="validating",
                      created_at=now, expires_at=now + window_s, request_counts=RequestCounts(total=len(lines)))
        await self.api.launch(Stored(tenant="acme", batch=batch),
                              parse(data, max_lines=100, tiers=self.api.ctx.tiers))
        return batch.id

    async def batch(self, batch_id: str) -> Record:
        loaded = await self.api.ledger.load(batch_id)
        assert loaded is not None
        return loaded[0].batch

    async def final(self, batch_id: str) -> Record:
        async def is_final() -> bool:
            return (await self.batch(batch_id)).status in FINAL

        await eventually(is_final, what=f"batch {batch_id} to be final")
        return await self.batch(batch_id)

    async def lines(self, file_id: str | None) -> list[dict[str, Any]]:
        assert file_id is not None
        data = await self.api.store.get("acme", file_id)
        assert data is not None
        return [json.loads(line) for line in data.splitlines()]


@pytest_asyncio.fixture
async def in_process(redis_url: str, prefix: str, tmp_path: Path) -> AsyncIterator[Callable[..., InProcess]]:
    made: list[InProcess] = []

    def make(**client: Any) -> InProcess:
        made.append(InProcess(redis_url, prefix, tmp_path, **client))
        return made[-1]

    yield make
    for each in made:
        await each.api.aclose()
        await each.sdk.aclose()


async def test_at_its_expiry_a_batch_ends_the_jobs_not_started_and_is_expired(
        roles: Roles, in_process: Callable[..., InProcess], client: aioredis.Redis, topo: Topology) -> None:
    roles.policy()  # no pool worker: nothing can start

    async def policy_up() -> bool:  # so the jobs are routed long before their deadline, the expiry
        return bool(await client.hlen(topo.policy_heartbeats))  # type: ignore[misc]

    await eventually(policy_up, what="the policy worker's first heartbeat")
    batches = in_process()
    await batches.api.start()
    batch_id = await batches.launch([request(f"x{i}") for i in range(3)], window_s=3)

    done = await batches.final(batch_id)
    assert done.status == "expired" and done.expired_at is not None and done.expired_at >= done.expires_at
    assert done.request_counts.failed == 3 and done.output_file_id is None
    errors = await batches.lines(done.error_file_id)
    assert [line["custom_id"] for line in errors] == ["x0", "x1", "x2"]
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert set((await results_per_job(client, topo)).values()) == {1}


async def test_a_line_the_policy_refuses_is_submitted_again_until_it_runs(
        roles: Roles, in_process: Callable[..., InProcess], client: aioredis.Redis, topo: Topology,
        tmp_path: Path) -> None:
    # A policy that refuses every batch job (its class wants a first token within 1 ms) once the
    # pool has finished a job; then the default policy, which admits them.
    strict = tmp_path / "strict.toml"
    strict.write_text(DEFAULT_POLICY.replace("[classes.batch]\nttft_ms = 60000", "[classes.batch]\nttft_ms = 1"))
    assert strict.read_text() != DEFAULT_POLICY
    refusing = roles.start("policy", "--config", str(strict))
    roles.worker("gpu")
    batches = in_process()
    await warm_up(batches.sdk, client, topo, {"gpu": Job.chat("llama-3.1-8b", "warm", max_tokens=2, slo="standard")})
    await batches.api.start()
    batch_id = await batches.launch([request("p0"), request("p1")], window_s=86_400)

    async def refused_twice() -> bool:  # each line's first job and its first resubmission
        entries = await xrange_all(client, [shard.reply("batches") for shard in topo.every_shard])
        return [decode_result(f[b"result"]).status for _, f in entries].count("rejected") >= 4

    await eventually(refused_twice, what="the policy refusing each line twice")
    refusing.send_signal(signal.SIGTERM)
    refusing.wait(timeout=15)
    roles.policy()
    done = await batches.final(batch_id)
    assert done.status == "completed" and done.request_counts.completed == 2, done
    output = await batches.lines(done.output_file_id)
    assert [line["custom_id"] for line in output] == ["p0", "p1"]
    # Each ran as a later attempt of its line (a new job id: the refused ones keep their outcome).
    assert all(line["response"]["request_id"].count(".") == 2 for line in output)


async def test_a_full_backlog_makes_a_batch_wait_then_go_on(
        roles: Roles, in_process: Callable[..., InProcess], client: aioredis.Redis, topo: Topology) -> None:
    batches = in_process(max_backlog=2)  # and no policy worker yet: the ingress fills at 2
    await batches.api.start()
    batch_id = await batches.launch([request(f"w{i}") for i in range(5)], window_s=86_400)

    async def full() -> bool:
        return bool(await client.xlen(topo.jobs) == 2)

    await eventually(full, what="the ingress backlog full")
    assert (await batches.batch(batch_id)).status == "in_progress"
    roles.policy()
    roles.worker("gpu")
    done = await batches.final(batch_id)
    assert done.status == "completed" and done.request_counts.completed == 5
    assert [line["custom_id"] for line in await batches.lines(done.output_file_id)] == [f"w{i}" for i in range(5)]
