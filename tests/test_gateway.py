"""The gateway on real processes: roles, ``python -m cli gateway``, and the official ``openai`` client.

The client is used unchanged but for ``base_url`` and ``api_key`` (and ``max_retries=0``, so
that a test sees each answer rather than the client's retries of it).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import redis.asyncio as aioredis

from broker.client import Client
from broker.config import load_config
from broker.topology import Topology
from broker.wire import ChatMessage, Job, decode_result
from cli.embedded import free_port
from cli.stack import wait_for_roles
from tests.conftest import FAST_ENV, ROOT, Roles
from tests.deployments import ON_BOTH
from tests.gateway_proc import KEY, OTHER_KEY, GatewayProc, start_gateway
from tests.helpers import warm_up
from tests.test_cli_stack import run_cli, start_up
from tests.test_slo_live import ADMISSION_CONFIG, wait_until_policy_sees

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


async def stack(roles: Roles, tmp_path: Path, topo: Topology, redis_url: str, *args: str) -> GatewayProc:
    """A policy worker, a worker of each pool and a gateway, every one ready."""
    roles.policy()
    roles.worker("gpu")
    roles.worker("accel")
    gateway = await start_gateway(roles, tmp_path, *args)
    wait_for_roles(redis_url, topo, {"gpu": 1, "accel": 1}, timeout=30)
    return gateway


async def result_of(client: aioredis.Redis, topo: Topology, job_id: str) -> object:
    done = await client.get(topo.of_job(job_id).done(job_id))
    assert done is not None, f"no outcome for {job_id}"
    return decode_result(done)


@ON_BOTH
async def test_the_official_client_gets_chat_completions_and_embeddings_with_and_without_streaming(
        roles: Roles, tmp_path: Path, topo: Topology, redis_url: str, client: aioredis.Redis) -> None:
    gateway = await stack(roles, tmp_path, topo, redis_url)
    api = gateway.openai()

    raw = await api.chat.completions.with_raw_response.create(model="llama-3.1-8b", messages=CHAT,  # type: ignore[arg-type]
                                                              max_tokens=12)
    chat = raw.parse()
    job_id = raw.headers["x-ib-job-id"]
    assert chat.choices[0].message.content and chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 12
    assert raw.headers["x-ib-pool"] in ("gpu", "accel") and float(raw.headers["x-ib-ttft-ms"]) >= 0
    assert (chat.model_extra or {})["broker"]["job_id"] == job_id
    result = await result_of(client, topo, job_id)
    assert (result.status, result.tenant, result.output) == ("ok", "acme", chat.choices[0].message.content)  # type: ignore[attr-defined]

    pieces, usage = [], None
    stream = await api.chat.completions.create(model="llama-3.1-8b", messages=CHAT, max_tokens=8,  # type: ignore[arg-type]
                                               stream=True, stream_options={"include_usage": True})
    async for part in stream:
        if part.choices:
            pieces.append(part.choices[0].delta.content or "")
        else:
            usage = part.usage
    assert "".join(pieces) and usage is not None and usage.completion_tokens == 8

    completion = await api.completions.create(model="llama-3.1-8b", prompt="Once upon a time", max_tokens=5)
    assert completion.object == "text_completion" and completion.choices[0].text
    texts = [part.choices[0].text async for part in
             await api.completions.create(model="llama-3.1-8b", prompt="Once", max_tokens=5, stream=True)]
    assert "".join(texts)

    embedded = await api.embeddings.create(model="minilm-l6", input=["red", "blue sky"])  # base64 on the wire
    assert [d.index for d in embedded.data] == [0, 1] and all(len(d.embedding) > 1 for d in embedded.data)
    floats = await api.embeddings.create(model="minilm-l6", input="red", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(embedded.data[0].embedding, rel=1e-6)

    models = [m.id async for m in api.models.list()]
    assert models == sorted({m for pool in load_config().pools.values() for m in pool.models})


async def test_service_tier_and_the_slo_header_choose_the_class_and_the_response_says_so(
        roles: Roles, tmp_path: Path, topo: Topology, redis_url: str) -> None:
    gateway = await stack(roles, tmp_path, topo, redis_url)
    api = gateway.openai()
    seen = {}
    for tier in ("priority", "flex"):
        raw = await api.chat.completions.with_raw_response.create(
            model="llama-3.1-8b", messages=CHAT, max_tokens=4, service_tier=tier)  # type: ignore[arg-type]
        seen[tier] = (raw.headers["x-ib-slo"], raw.parse().service_tier)
    raw = await api.chat.completions.with_raw_response.create(
        model="llama-3.1-8b", messages=CHAT, max_tokens=4, extra_headers={"X-IB-SLO": "standard"})  # type: ignore[arg-type]
    seen["header"] = (raw.headers["x-ib-slo"], raw.parse().service_tier)
    assert seen == {"priority": ("interactive", "priority"), "flex": ("batch", "flex"),
                    "header": ("standard", "default")}


async def test_bad_keys_unknown_models_and_bad_parameters_get_openais_errors(
        roles: Roles, tmp_path: Path) -> None:
    gateway = await start_gateway(roles, tmp_path)  # no roles needed: nothing here becomes a job
    for key in ("sk-wrong", ""):
        with pytest.raises(openai.AuthenticationError) as denied:
            await gateway.openai(key=key or "x").models.list()
        assert denied.value.code == "invalid_api_key"
    async with httpx.AsyncClient() as http:
        bare = await http.post(f"{gateway.url}/v1/chat/completions", json={"model": "llama-3.1-8b", "messages": CHAT})
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get(f"{gateway.url}/healthz")).status_code == 200  # health needs no key
        wrong = await http.get(f"{gateway.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"})
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
        nowhere = await http.get(f"{gateway.url}/v1/engines", headers={"authorization": f"Bearer {KEY}"})
        assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "unknown_url"
    api = gateway.openai(key=OTHER_KEY)
    with pytest.raises(openai.NotFoundError) as unknown:
        await api.chat.completions.create(model="gpt-9", messages=CHAT)  # type: ignore[arg-type]
    assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.BadRequestError) as bad:
        await api.chat.completions.create(model="llama-3.1-8b", messages=[{"role": "user", "content": 3}])  # type: ignore[list-item]
    assert bad.value.param == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as header:
        await api.chat.completions.create(model="llama-3.1-8b", messages=CHAT,  # type: ignore[arg-type]
                                          extra_headers={"X-IB-Deadline-Ms": "soon"})
    assert header.value.code == "invalid_header"
    with pytest.raises(openai.APIStatusError) as large:
        await api.chat.completions.create(model="llama-3.1-8b", messages=[{"role": "user", "content": "x" * (3 << 20)}])
    assert (large.value.status_code, large.value.code) == (413, "body_too_large")
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{gateway.url}/metrics")).text
    assert 'inference_broker_gateway_requests_total{code="404",endpoint="chat"} 1.0' in text


async def test_a_full_backlog_is_a_429_with_retry_after(roles: Roles, tmp_path: Path, topo: Topology,
                                                        client: aioredis.Redis) -> None:
    # No policy worker: the one job the backlog holds stays there.
    gateway = await start_gateway(roles, tmp_path, env={"IB_MAX_BACKLOG": "1"})
    await client.xadd(topo.jobs, {"job": b'{"id": "filler", "model": "llama-3.1-8b", "prompt": "x", '
                                         b'"kind": "completion"}'})
    with pytest.raises(openai.RateLimitError) as refused:
        await gateway.openai().chat.completions.create(model="llama-3.1-8b", messages=CHAT)  # type: ignore[arg-type]
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.code == "backlog_full"


async def test_a_deadline_the_queue_cannot_meet_is_a_504(roles: Roles, tmp_path: Path, topo: Topology,
                                                         redis_url: str) -> None:
    gateway = await stack(roles, tmp_path, topo, redis_url)
    with pytest.raises(openai.APIStatusError) as late:
        await gateway.openai().chat.completions.create(model="llama-3.1-8b", messages=CHAT,  # type: ignore[arg-type]
                                                       extra_headers={"X-IB-Deadline-Ms": "0.001"})
    assert late.value.status_code == 504 and late.value.code == "deadline_exceeded"


def test_the_gateway_refuses_to_start_without_keys_and_says_how_to_make_one(redis_url: str) -> None:
    done = subprocess.run([sys.executable, "-m", "cli", "gateway", "--redis-url", redis_url, "--port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert done.returncode == 2
    assert "no API keys configured" in done.stderr and "--no-auth" in done.stderr


def test_hash_key_reads_the_key_on_stdin_and_prints_the_keys_file_line() -> None:
    done = subprocess.run([sys.executable, "-m", "cli", "gateway", "hash-key", "--tenant", "acme"], cwd=ROOT,
                          input=f"{KEY}\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{hashlib.sha256(KEY.encode()).hexdigest()} acme\n"


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """As tests/test_cli_stack.py's: no deployment in the environment, `up`'s record in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "IB_PREFIX", "IB_CONFIG")}
    return {**env, "XDG_RUNTIME_DIR": str(tmp_path), "IB_GATEWAY_PORT": "0"}


async def test_up_serves_the_openai_api_and_prints_where(cli_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    up, _state = start_up({**cli_env, "IB_GATEWAY_PORT": str(port)}, tmp_path)
    said = f"OpenAI API: http://127.0.0.1:{port}/v1  (no API keys: any key works)"

    def until_said() -> None:
        assert up.stderr is not None
        for line in up.stderr:  # ends when up exits, so the wait below bounds it
            if said in line:
                return
        raise AssertionError(f"up never printed {said!r}")

    try:
        await asyncio.wait_for(asyncio.to_thread(until_said), 60)  # printed once every role and the gateway are up
        reply = await GatewayProc(up, port).openai(key="anything").chat.completions.create(  # type: ignore[arg-type]
            model="llama-3.1-8b", messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
        assert reply.usage is not None and reply.usage.completion_tokens == 3  # up's gateway takes any key
    finally:
        up.send_signal(signal.SIGTERM)
        _out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err


def test_demo_via_gateway_sends_the_workload_through_the_openai_client(cli_env: dict[str, str]) -> None:
    done = run_cli("demo", "--via", "gateway", "--jobs", "20", "--rate", "40", env=cli_env, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "through the gateway at http://127.0.0.1:" in done.stdout
    assert "20 jobs in" in done.stdout and "20 ok, 0 not ok" in done.stdout


async def test_a_job_admission_refuses_is_a_429_with_the_policys_retry_after(
        roles: Roles, tmp_path: Path, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(ADMISSION_CONFIG)  # one gpu slot; interactive sheds, patient runs whatever it waits
    env = {**FAST_ENV, "IB_CONFIG": str(config)}
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", env=env)
    gateway = await start_gateway(roles, tmp_path, env=env)
    topo = Topology(prefix)
    await wait_until_policy_sees(redis_url, client, topo, ["gpu"])
    chat = [ChatMessage("user", "hello " * 50)]
    async with Client(redis_url, prefix=prefix) as sdk:
        await warm_up(sdk, client, topo, {"gpu": Job(id="warm", model="llama-3.1-8b", messages=chat, slo="patient",
                                                     max_tokens=500)})
        # Two long jobs on the one slot (about 2.3 s each): an interactive job behind them cannot
        # meet its 500 ms, and is refused at once with when to come back.
        await sdk.submit_many([Job(id=f"long-{i}", model="llama-3.1-8b", messages=chat, slo="patient",
                                   max_tokens=500) for i in range(2)])
        with pytest.raises(openai.RateLimitError) as refused:
            await gateway.openai().chat.completions.create(
                model="llama-3.1-8b", messages=[{"role": "user", "content": "hello " * 50}], max_tokens=500)
    response = refused.value.response
    assert refused.value.code == "slo_unattainable" and int(response.headers["retry-after"]) >= 1
    result = decode_result(await client.get(topo.done(response.headers["x-ib-job-id"])))
    assert result.status == "rejected" and result.tenant == "acme"
    assert int(response.headers["retry-after"]) == math.ceil(result.retry_after_s or 0)
