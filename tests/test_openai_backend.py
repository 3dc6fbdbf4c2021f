"""The OpenAI-compatible HTTP backend against a local server that speaks the protocol.

What the server is told to do (TTFT, token rate, 429s, 5xx, broken streams) is checked
against what the backend measures and reports. The official ``openai`` client checks the
server itself, and one test runs a job through the whole broker to such a server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import openai
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from broker.client import Client
from broker.topology import Topology
from broker.wire import ChatMessage, Job
from policies.config import Endpoint, config_from_dict
from tests.conftest import Roles
from tests.helpers import eventually
from tests.openai_server import Behaviour, OpenAIServer, embedding, serve
from tests.test_imports import modules_after
from workers.backend import BackendError, CapacityExceeded
from workers.endpoints import EndpointConfigError, retry_after_s
from workers.factory import BackendUnavailable, make_backend
from workers.openai_backend import CoolingDown, DeadlineExceeded, OpenAIBackend
from workers.simulated import SimulatedBackend

KEY = "sk-test-5ecret-0123456789abcdef"


def chat(max_tokens: int = 16, **fields: object) -> Job:
    return Job.chat("test-model", "Why is the sky blue?", max_tokens=max_tokens, **fields)


def completion(max_tokens: int = 16) -> Job:
    return Job(id="c1", model="test-model", kind="completion", prompt="Once upon a time", max_tokens=max_tokens)


class Clock:
    """A wall clock the test can move forward: cooldowns expire without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest_asyncio.fixture
async def server() -> AsyncIterator[OpenAIServer]:
    async with serve() as s:
        yield s


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Callable[..., OpenAIBackend]]:
    """Build backends that are closed at the end of the test."""
    made: list[OpenAIBackend] = []

    def build(*urls: str, **kwargs: object) -> OpenAIBackend:
        backend = OpenAIBackend([Endpoint(base_url=u) for u in urls], **kwargs)  # type: ignore[arg-type]
        made.append(backend)
        return backend

    yield build
    for backend in made:
        await backend.aclose()


# --------------------------------------------------------------------------- streaming and timing


@pytest.mark.parametrize("job", [chat(40), completion(40)], ids=["chat", "completion"])
async def test_measured_ttft_and_time_per_token_match_the_server(
        server: OpenAIServer, make: Callable[..., OpenAIBackend], job: Job) -> None:
    server.behaviour = Behaviour(ttft_s=0.15, tokens_per_s=100)
    backend = make(server.url)
    started = time.time()
    out = await backend.run(job)
    ttft = out.first_token_at - started
    tpot = (out.finished_at - out.first_token_at) / (out.completion_tokens - 1)
    assert 0.15 <= ttft < 0.15 + 0.1, ttft
    assert tpot == pytest.approx(0.010, rel=0.2), tpot
    assert out.completion_tokens == 40 and out.prompt_tokens == job.input_chars() // 4  # the server's usage
    assert out.output == "".join(f"tok{i} " for i in range(40))
    body = server.requests[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 40 and body["model"] == "test-model"
    assert ("messages" in body) == (job.kind == "chat") and ("prompt" in body) == (job.kind == "completion")


async def test_each_streamed_piece_reaches_the_token_sink_as_it_arrives(
        server: OpenAIServer, make: Callable[..., OpenAIBackend]) -> None:
    server.behaviour = Behaviour(ttft_s=0.05, tokens_per_s=100)
    backend = make(server.url)
    seen: list[tuple[str, float]] = []
    out = await backend.run(Job.chat("test-model", "hi", max_tokens=10),
                            on_token=lambda t: seen.append((t, time.time())))
    assert "".join(t for t, _ in seen) == out.output == "".join(f"tok{i} " for i in range(10))
    assert seen[-1][1] - seen[0][1] >= 0.08  # one by one, at the server's pace


async def test_token_counts_come_from_usage_else_from_the_chunks(
        server: OpenAIServer, make: Callable[..., OpenAIBackend]) -> None:
    job = Job(id="u", model="test-model", kind="chat", max_tokens=12,
              messages=[ChatMessage("system", "Be brief."), ChatMessage("user", "x" * 400)])
    backend = make(server.url)
    out = await backend.run(job)
    assert (out.prompt_tokens, out.completion_tokens) == (102, 12)  # the server's usage: (9 + 400) // 4
    assert server.requests[0].body["messages"][0] == {"role": "system", "content": "Be brief."}
    server.behaviour.send_usage = False
    server.behaviour.output_tokens = 7
    out = await backend.run(job)
    assert (out.prompt_tokens, out.completion_tokens) == (job.prompt_tokens(), 7)


async def test_model_names_map_to_the_endpoints_names(server: OpenAIServer) -> None:
    backend = OpenAIBackend([Endpoint(base_url=server.url, models={"llama-3.1-8b": "test-model"})])
    try:
        out = await backend.run(Job.chat("llama-3.1-8b", "hi", max_tokens=3))
        assert out.completion_tokens == 3 and server.requests[-1].body["model"] == "test-model"
        with pytest.raises(BackendError, match="no endpoint .* serves model 'other'") as info:
            await backend.run(Job.chat("other", "hi"))
        assert not info.value.retryable
    finally:
        await backend.aclose()


async def test_one_connection_is_reused_and_aclose_closes_it(
        server: OpenAIServer, make: Callable[..., OpenAIBackend]) -> None:
    backend = make(server.url)
    for _ in range(4):
        await backend.run(chat(2))
    await backend.run(Job(id="e", model="test-embed", kind="embedding", texts=["a"]))
    assert len({r.peer for r in server.requests}) == 1
    await backend.aclose()
    assert backend.http.is_closed


# --------------------------------------------------------------------------- failures, retries, cooldown


async def test_429_cools_the_endpoint_down_and_the_other_endpoint_takes_the_work(
        make: Callable[..., OpenAIBackend]) -> None:
    clock = Clock()
    async with serve(Behaviour(fail_429=1, retry_after="30")) as a, serve() as b:
        backend = make(a.url, b.url, clock=clock)
        with pytest.raises(CapacityExceeded, match="HTTP 429.*cooling down 30.0 s") as info:
            await backend.run(chat(2))
        assert info.value.retryable
        until = backend.cooling()[a.url]
        assert until == pytest.approx(clock() + 30, abs=1)  # Retry-After honoured
        assert backend.cooldown_until() is None  # b still serves
        for _ in range(3):
            await backend.run(chat(2))
        assert (len(a.requests), len(b.requests)) == (1, 3)
        clock.offset += 31
        assert backend.cooling() == {}
        await backend.run(chat(2))
        await backend.run(chat(2))
        assert (len(a.requests), len(b.requests)) == (2, 4)  # round-robin again


async def test_while_every_endpoint_cools_jobs_fail_fast_without_a_request(
        server: OpenAIServer, make: Callable[..., OpenAIBackend]) -> None:
    clock = Clock()
    server.behaviour.fail_500 = 1
    backend = make(server.url, clock=clock)
    with pytest.raises(BackendError, match="HTTP 500.*server had an error") as info:
        await backend.run(chat())
    assert info.value.retryable
    until = backend.cooldown_until()
    assert until is not None and until == pytest.approx(clock() + 1.0, abs=0.2)  # no Retry-After: base backoff
    with pytest.raises(CoolingDown) as cooling:
        await backend.run(chat())
    assert cooling.value.retryable and cooling.value.until == until
    assert len(server.requests) == 1
    clock.offset += 1.1
    assert (await backend.run(chat(2))).completion_tokens == 2
    assert backend.cooldown_until() is None


async def test_backoff_doubles_per_consecutive_failure_up_to_the_cap_and_resets_on_success(
        server: OpenAIServer, make: Callable[..., OpenAIBackend]) -> None:
    clock = Clock()
    server.behaviour = Behaviour(fail_500=5, fail_status=503)
    backend = make(server.url, clock=clock, base_cooldown_s=1.0, max_cooldown_s=4.0)
    cooldowns = []
    for _ in range(5):
        with pytest.raises(BackendError):
            await backend.run(chat())
        until = backend.cooldown_until()
        assert until is not None
        cooldowns.append(round(until - clock()))
        clock.offset += cooldowns[-1] + 0.01
    assert cooldowns == [1, 2, 4, 4, 4]
    await backend.run(chat(1))
    server.behaviour.fail_500 = 1
    with pytest.raises(BackendError):
        await backend.run(chat())
    assert backend.endpoints.states[0].failures == 1


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_client_errors_are_permanent_and_do_not_cool_the_endpoint(
        server: OpenAIServer, make: Callable[..., OpenAIBackend], status: int) -> None:
    server.behaviour = Behaviour(fail_500=1, fail_status=status)
    backend = make(server.url)
    with pytest.raises(BackendError, match=f"HTTP {status}") as info:
        await backend.run(chat())
    assert not info.value.retryable and backend.cooling() == {}


async def test_an_unknown_model_is_a_permanent_error_with_the_servers_message(
        server: OpenAIServer, make: Callable[..., OpenAIBackend]) -> None:
    backend = make(server.url)
    with pytest.raises(BackendError, match="HTTP 404: The model `nope` does not exist") as info:
        await backend.run(Job.chat("nope", "hi"))
    assert not info.value.retryable


@pytest.mark.parametrize("mode", ["close", "error"])
async def test_a_stream_that_breaks_midway_is_retryable_and_cools_the_endpoint(
        server: OpenAIServer, make: Callable[..., OpenAIBackend], mode: str) -> None:
    server.behaviour = Behaviour(fail_mid_stream=1, mid_stream_after=3, mid_stream_mode=mode)  # type: ignore[arg-type]
    backend = make(server.url)
    with pytest.raises(BackendError, match="incomplete|error event mid-stream after 3 tokens") as info:
        await backend.run(chat(10))
    assert info.value.retryable and server.url in backend.cooling()


async def test_a_refused_connection_is_retryable_and_cools_the_endpoint(
        make: Callable[..., OpenAIBackend]) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = make(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(BackendError, match="ConnectError") as info:
        await backend.run(chat())
    assert info.value.retryable and backend.cooldown_until() is not None


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert retry_after_s({"retry-after": "2.5"}, now) == 2.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}, now) == 0.25
    assert retry_after_s({"retry-after": "Tue, 14 Nov 2023 22:13:40 GMT"}, now) == pytest.approx(20.0)
    assert retry_after_s({"retry-after": "-3"}, now) == 0.0
    assert retry_after_s({"retry-after": "1e9"}, now) == 3600.0
    assert retry_after_s({"retry-after": "soon"}, now) is None
    assert retry_after_s({}, now) is None


# --------------------------------------------------------------------------- deadlines and timeouts


async def test_the_deadline_cuts_a_slow_stream(server: OpenAIServer, make: Callable[..., OpenAIBackend]) -> None:
    server.behaviour = Behaviour(ttft_s=0.05, tokens_per_s=20)  # 100 tokens would take 5 s
    backend = make(server.url)
    started = time.time()
    with pytest.raises(DeadlineExceeded, match="deadline passed 0.3. s into its request .* tokens; cut") as info:
        await backend.run(chat(100, deadline=started + 0.35))
    assert 0.3 <= time.time() - started < 1.0
    assert not info.value.retryable and backend.cooling() == {}  # the job's budget, not the endpoint's fault

    async def server_saw_the_disconnect() -> bool:
        return server.disconnected == 1

    await eventually(server_saw_the_disconnect, timeout=5, what="the server to see the client go")


async def test_a_passed_deadline_sends_nothing(server: OpenAIServer, make: Callable[..., OpenAIBackend]) -> None:
    backend = make(server.url)
    with pytest.raises(DeadlineExceeded, match="before its request was sent"):
        await backend.run(chat(deadline=time.time() - 1))
    assert server.requests == []


async def test_the_request_timeout_bounds_a_hung_endpoint(
        server: OpenAIServer, make: Callable[..., OpenAIBackend]) -> None:
    server.behaviour = Behaviour(ttft_s=10)
    backend = make(server.url, request_timeout_s=0.2)
    started = time.time()
    with pytest.raises(BackendError, match="request_timeout_s = 0.2 s") as info:
        await backend.run(chat(deadline=started + 60))
    assert time.time() - started < 1.5
    assert info.value.retryable and not isinstance(info.value, DeadlineExceeded)
    assert server.url in backend.cooling()


# --------------------------------------------------------------------------- embeddings


async def test_embeddings(server: OpenAIServer, make: Callable[..., OpenAIBackend]) -> None:
    server.behaviour.embedding_dim = 16
    backend = make(server.url)
    texts = ["a cat sat on the mat", "stock markets fell", "x"]
    out = await backend.run(Job(id="e", model="test-embed", kind="embedding", texts=texts))
    assert out.embeddings is not None and len(out.embeddings) == len(texts)
    for vector, text in zip(out.embeddings, texts, strict=True):
        assert vector == pytest.approx(embedding(text, 16))
    assert out.first_token_at == out.finished_at and out.completion_tokens == 0
    assert out.prompt_tokens == sum(len(t) for t in texts) // 4  # from the server's usage
    assert server.requests[0].path == "/v1/embeddings"
    assert server.requests[0].body == {"model": "test-embed", "input": texts, "encoding_format": "float"}


# --------------------------------------------------------------------------- keys


async def test_the_key_goes_as_a_bearer_token_and_nowhere_else(
        server: OpenAIServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    server.behaviour.api_key = KEY
    for source in ({"api_key_env": "TEST_OPENAI_KEY"}, {"api_key_file": str(key_file)}):
        backend = OpenAIBackend([Endpoint(base_url=server.url, **source)],  # type: ignore[arg-type]
                                environ={"TEST_OPENAI_KEY": KEY})
        try:
            await backend.run(chat(2))
            assert server.requests[-1].authorization == f"Bearer {KEY}"
            shown = [repr(backend), str(backend.endpoints), backend.name, repr(backend.endpoints.states[0].key)]
            server.behaviour.fail_429 = 1
            with pytest.raises(BackendError) as limited:
                await backend.run(chat(2))
            server.behaviour.api_key = "another-key"  # the server now refuses ours, and echoes it back
            backend.endpoints.states[0].cooling_until = 0
            with pytest.raises(BackendError, match="HTTP 401: Incorrect API key provided: \\*\\*\\*") as refused:
                await backend.run(chat(2))
            assert not refused.value.retryable
            shown += [str(limited.value), repr(limited.value), str(refused.value), repr(refused.value)]
            assert not [s for s in shown if KEY in s], shown
            server.behaviour.api_key = KEY
        finally:
            await backend.aclose()
    assert "cooling down" in caplog.text and KEY not in caplog.text


def test_a_missing_key_is_a_clear_error_that_names_where_it_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(EndpointConfigError, match="environment variable NOPE_KEY is unset"):
        OpenAIBackend([Endpoint(base_url="http://127.0.0.1:1/v1", api_key_env="NOPE_KEY")], environ={})
    with pytest.raises(EndpointConfigError, match="cannot read api_key_file .*missing.*No such file"):
        OpenAIBackend([Endpoint(base_url="http://127.0.0.1:1/v1", api_key_file=str(tmp_path / "missing"))])
    spec = config_from_dict({
        "classes": {"standard": {"ttft_ms": 1000}},
        "pools": {"gpu": {"models": ["llama-3.1-8b"], "backend": "openai",
                          "endpoints": [{"base_url": "https://u:pw@api.example/v1", "api_key_env": "NOPE_KEY"}]}},
    }).pools["gpu"]
    with pytest.raises(BackendUnavailable, match="https://api.example/v1: environment variable NOPE_KEY") as info:
        make_backend(spec)
    assert "pw" not in str(info.value)  # credentials in the URL are not shown either


# --------------------------------------------------------------------------- factory


async def test_the_factory_builds_each_pools_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_dict({
        "classes": {"standard": {"ttft_ms": 1000}},
        "pools": {
            "gpu": {"models": ["llama-3.1-8b"], "concurrency": 7, "request_timeout_s": 5, "backend": "openai",
                    "endpoints": [{"base_url": "http://127.0.0.1:9/v1"}]},
            "sim": {"models": ["llama-3.1-8b"], "profile": "accel", "concurrency": 2},
            "embed": {"models": ["minilm-l6"], "kinds": ["embedding"], "backend": "minilm"},
        },
    })
    sim = make_backend(cfg.pools["sim"], faults=True)
    assert isinstance(sim, SimulatedBackend) and sim.faults and sim.profile.name == "accel"
    http = make_backend(cfg.pools["gpu"], faults=False)
    assert isinstance(http, OpenAIBackend) and http.request_timeout_s == 5
    await http.aclose()
    monkeypatch.setattr("workers.minilm.missing_modules", lambda: ["torch"])  # as without the `model` extra
    with pytest.raises(BackendUnavailable, match=r"pip install 'inference-broker\[model\]'"):
        make_backend(cfg.pools["embed"], faults=False)


def test_only_openai_pools_load_httpx() -> None:
    """A simulated pool's worker pays for no HTTP stack, and no backend module needs torch."""
    loaded = modules_after("import workers.factory, workers.simulated")
    assert "workers" in loaded and not loaded & {"httpx", "httpcore", "torch"}
    assert "httpx" in modules_after("import workers.openai_backend")


# --------------------------------------------------------------------------- the official client


async def test_the_official_openai_client_accepts_the_test_server(server: OpenAIServer) -> None:
    server.behaviour = Behaviour(tokens_per_s=500)
    client = openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "tok0 tok1 tok2 tok3 tok4 "
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

        whole = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert whole.choices[0].message.content == "tok0 tok1 tok2 " and whole.usage is not None

        streamed = await client.completions.create(model="test-model", prompt="Once", max_tokens=4, stream=True)
        assert "".join([c.choices[0].text async for c in streamed if c.choices]) == "tok0 tok1 tok2 tok3 "
        plain = await client.completions.create(model="test-model", prompt="Once", max_tokens=2)
        assert plain.choices[0].text == "tok0 tok1 "

        vectors = await client.embeddings.create(model="test-embed", input=["a", "b"])  # base64 on the wire
        assert [d.embedding for d in vectors.data] == [pytest.approx(embedding(t, 8), abs=1e-6) for t in "ab"]
        floats = await client.embeddings.create(model="test-embed", input="a", encoding_format="float")
        assert floats.data[0].embedding == pytest.approx(embedding("a", 8))

        assert [m.id async for m in client.models.list()] == ["test-model", "test-embed"]

        server.behaviour.fail_429 = 1
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "x"}])
    finally:
        await client.close()


# --------------------------------------------------------------------------- through the broker


async def test_a_chat_job_through_the_broker_to_an_openai_pool(
        server: OpenAIServer, roles: Roles, redis_url: str, prefix: str, tmp_path: Path) -> None:
    server.behaviour = Behaviour(ttft_s=0.1, tokens_per_s=200, api_key=KEY)
    env = {**_openai_pool(tmp_path, server, key_env="TEST_OPENAI_KEY"), "TEST_OPENAI_KEY": KEY}
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", "--grace", "5", env=env)
    async with Client(redis_url, prefix=prefix, block_ms=200) as client:
        result = await asyncio.wait_for(client.run(Job.chat("llama-3.1-8b", "hello", max_tokens=20), timeout=30), 35)
    assert result.status == "ok", result
    assert result.pool == "gpu" and result.output == "".join(f"tok{i} " for i in range(20))
    assert result.usage.completion_tokens == 20
    assert result.timing is not None and result.metrics is not None
    assert result.timing.first_token_at - result.timing.started_at >= 0.1
    assert result.metrics.time_per_output_token_ms == pytest.approx(5.0, rel=0.5)
    assert server.requests[-1].authorization == f"Bearer {KEY}"
    assert KEY not in roles.logs()


def _openai_pool(tmp_path: Path, server: OpenAIServer, key_env: str | None = None) -> dict[str, str]:
    """Role environment for one `gpu` pool on the test server (its key in ``key_env``, if any)."""
    key = f'api_key_env = "{key_env}"\n' if key_env else ""
    config = tmp_path / "policy.toml"
    config.write_text(f"""
[classes.standard]
ttft_ms = 2000

[pools.gpu]
models = ["llama-3.1-8b"]
backend = "openai"
concurrency = 4

[[pools.gpu.endpoints]]
base_url = "{server.url}"
{key}models = {{ "llama-3.1-8b" = "test-model" }}
""")
    return {"IB_CONFIG": str(config), "IB_BLOCK_MS": "200", "IB_CLAIM_IDLE_MS": "3000",
            "IB_CLAIM_INTERVAL_S": "0.1", "IB_RETRY_BACKOFF_MS": "50"}


async def test_a_429_is_retried_once_the_endpoint_is_back_not_before(
        server: OpenAIServer, roles: Roles, redis_url: str, prefix: str, tmp_path: Path) -> None:
    server.behaviour = Behaviour(fail_429=1, retry_after="1")
    env = _openai_pool(tmp_path, server)
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", "--grace", "5", env=env)
    async with Client(redis_url, prefix=prefix, block_ms=200) as client:
        result = await asyncio.wait_for(client.run(Job.chat("llama-3.1-8b", "hi", max_tokens=4), timeout=30), 35)
    assert result.status == "ok" and result.timing is not None, result
    # The retry backoff is 25-50 ms, but the worker held the job until the Retry-After had
    # passed: one retry, not a run of wasted deliveries against a cooling endpoint.
    assert result.timing.attempt == 2
    first, second = server.requests[0].at, server.requests[-1].at
    assert len(server.requests) == 2 and second - first >= 1.0


async def test_a_job_cut_off_at_its_deadline_ends_expired(
        server: OpenAIServer, roles: Roles, redis_url: str, prefix: str, tmp_path: Path,
        client: aioredis.Redis) -> None:
    server.behaviour = Behaviour(ttft_s=0.1, tokens_per_s=5)
    env = _openai_pool(tmp_path, server)
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", "--grace", "5", env=env)
    job = Job.chat("llama-3.1-8b", "hi", max_tokens=50)
    topo = Topology(prefix)

    async def both_up() -> bool:  # a role still starting would let the deadline pass before routing
        return bool(await client.hlen(topo.policy_heartbeats)  # type: ignore[misc]
                    and await client.hlen(topo.heartbeats("gpu")))  # type: ignore[misc]

    await eventually(both_up, timeout=30, what="the policy and the gpu worker to start")
    async with Client(redis_url, prefix=prefix, block_ms=200) as sdk:
        # Routed within the deadline; 50 tokens at 5/s take 10 s, the job allows 3 s.
        job = msgspec.structs.replace(job, deadline=time.time() + 3)
        result = await asyncio.wait_for(sdk.run(job, timeout=30), 35)
    assert result.status == "expired", result
    assert result.error and "DeadlineExceeded" in result.error and "cut off" in result.error
    assert await client.xlen(topo.dead) == 0  # an outcome, not a failure
