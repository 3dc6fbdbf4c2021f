"""TLS and mutual TLS against a TLS-only redis-server: the whole pipeline, and every way it fails.

The roles are real processes (``Roles``); certificates come from openssl (``tls_certs``).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from redis.asyncio.connection import RedisSSLContext, parse_url

from broker import logs
from broker.client import Client
from broker.connection import connect, misconfiguration, redacted, wait_ready
from broker.errors import RedisMisconfigured
from broker.settings import Settings
from broker.wire import Job
from cli.embedded import free_port
from tests.conftest import ROOT, Roles, TlsCerts, TlsRedis
from tests.gateway_proc import GatewayProc
from tests.helpers import fails_at_once

N = 12


def node_url(server: TlsRedis) -> str:
    """The server's URL with no TLS options: those come from the settings (IB_REDIS_TLS_*)."""
    return f"rediss://127.0.0.1:{server.port}/0"


def tls_env(certs: TlsCerts, *, client_cert: bool = True) -> dict[str, str]:
    env = {"IB_REDIS_TLS_CA": str(certs.ca)}
    return {**env, "IB_REDIS_TLS_CERT": str(certs.cert), "IB_REDIS_TLS_KEY": str(certs.key)} if client_cert else env


def small_jobs(tag: str) -> list[Job]:
    """Completions the default policy sends to the GPU pool, a few tokens each."""
    return [Job(id=f"{tag}-{i}", model="llama-3.1-8b", kind="completion", prompt="p" * 100, max_tokens=2 + i % 4)
            for i in range(N)]


@pytest.mark.parametrize("where", ["tls", "mutual-tls", "mutual-tls-cluster"])
async def test_the_pipeline_runs_over_tls(where: str, make_roles: Callable[[str], Roles], prefix: str,
                                          request: pytest.FixtureRequest) -> None:
    # TLS: the CA in the URL's query, as redis-py takes it. Mutual TLS: the URL names only the
    # server, and the CA, certificate and key come from IB_REDIS_TLS_* (out of argv and URLs).
    server: TlsRedis = request.getfixturevalue({"tls": "tls_redis", "mutual-tls": "mtls_redis",
                                                "mutual-tls-cluster": "mtls_cluster"}[where])
    url, env = (server.url, {}) if where == "tls" else (node_url(server), tls_env(server.certs))
    if where.endswith("cluster"):
        url = f"rediss+cluster://127.0.0.1:{server.port}"
    roles = make_roles(url)
    procs = [roles.start("policy", env=env), roles.start("worker", "--pool", "gpu", "--grace", "5", env=env)]
    settings = Settings.from_env(env, redis_url=url, prefix=prefix)  # the SDK takes the settings' URL
    jobs = small_jobs("tls")
    async with Client(settings.redis_url or "", prefix=prefix) as sdk:
        await sdk.submit_many(jobs)
        results = await asyncio.wait_for(asyncio.gather(*(sdk.result(j.id, timeout=30) for j in jobs)), 40)
    assert [r.status for r in results] == ["ok"] * N, [(r.id, r.status, r.error) for r in results]
    assert {r.id for r in results} == {j.id for j in jobs}
    assert {r.pool for r in results} == {"gpu"}
    assert all(p.poll() is None for p in procs), roles.logs()


async def test_the_gateway_serves_over_mutual_tls(mtls_redis: TlsRedis, make_roles: Callable[[str], Roles]) -> None:
    # The gateway builds its SDK client and its readiness probe from the same settings.
    env = tls_env(mtls_redis.certs)
    roles = make_roles(node_url(mtls_redis))
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", "--grace", "5", env=env)
    port = free_port()
    gateway = GatewayProc(roles.start("gateway", "--port", str(port), "--no-auth", env=env), port)
    await gateway.ready()  # /readyz: its probe reached Redis
    reply = await gateway.openai().chat.completions.create(
        model="llama-3.1-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=4, timeout=30)
    assert reply.choices[0].message.content


def exited_at_once(proc: subprocess.Popen[bytes], within_s: float = 20) -> int:
    try:
        return proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {within_s} s: it should have failed at once") from None


def test_without_a_client_certificate_the_roles_fail_at_once(mtls_redis: TlsRedis, make_roles: Callable[[str], Roles],
                                                             tmp_path: Path) -> None:
    # A server that requires mutual TLS: waiting (wait_ready's 30 s) would not fix it.
    roles = make_roles(node_url(mtls_redis))
    env = tls_env(mtls_redis.certs, client_cert=False)
    procs = [roles.start("policy", env=env), roles.start("worker", "--pool", "gpu", "--grace", "5", env=env)]
    for proc in procs:
        assert exited_at_once(proc) != 0
    for log in sorted((tmp_path / "logs").glob("*.log")):
        text = log.read_text()
        assert "requires a client certificate" in text and "IB_REDIS_TLS_CERT" in text, text
        assert "Traceback" not in text, text


@pytest.mark.parametrize("cluster", [False, True], ids=["node", "cluster"])
async def test_without_a_client_certificate_a_client_fails_at_once(cluster: bool,
                                                                 request: pytest.FixtureRequest) -> None:
    # The cluster client's first command often finds its connection reset before the server's
    # alert is read: the reason is then learnt by a handshake of its own (broker.tls.refusal).
    server: TlsRedis = request.getfixturevalue("mtls_cluster" if cluster else "mtls_redis")
    url = Settings(redis_url=f"rediss{'+cluster' if cluster else ''}://127.0.0.1:{server.port}",
                   redis_tls_ca=server.ca).redis_url or ""
    error = await fails_at_once(url)
    assert "requires a client certificate" in error and "IB_REDIS_TLS_CERT" in error


async def test_a_reset_after_the_handshake_is_explained_by_a_probe(mtls_redis: TlsRedis) -> None:
    # What the race above leaves a client with: a connection reset at its first read, no alert.
    error = ConnectionError("Error while reading from 127.0.0.1: (104, 'Connection reset by peer')")
    error.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    without_cert = RedisSSLContext(ca_certs=str(mtls_redis.ca), cert_reqs="required")
    reason = await misconfiguration(error, "127.0.0.1", mtls_redis.port, tls=True, connected=True,
                                    tls_context=without_cert)
    assert reason is not None and "requires a client certificate" in reason
    certs = mtls_redis.certs
    with_cert = RedisSSLContext(ca_certs=str(certs.ca), certfile=str(certs.cert), keyfile=str(certs.key),
                                cert_reqs="required")
    assert await misconfiguration(error, "127.0.0.1", mtls_redis.port, tls=True, connected=True,
                                  tls_context=with_cert) is None  # accepted: the reset was something else


def test_the_cli_with_a_wrong_ca_exits_with_one_line(tls_redis: TlsRedis, prefix: str) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("IB_")}, "REDIS_URL": node_url(tls_redis),
           "IB_REDIS_TLS_CA": str(tls_redis.certs.other_ca), "IB_PREFIX": prefix}
    done = subprocess.run([sys.executable, "-m", "cli", "submit", "--prompt", "hi", "--timeout", "5"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "does not trust" in lines[0] and str(tls_redis.certs.other_ca) in lines[0] and "IB_REDIS_TLS_CA" in lines[0]


def with_files(server: TlsRedis, **files: Path) -> str:
    return Settings(redis_url=node_url(server), redis_tls_ca=files.get("ca"), redis_tls_cert=files.get("cert"),
                    redis_tls_key=files.get("key")).redis_url or ""


async def test_a_wrong_ca_fails_at_once(mtls_redis: TlsRedis) -> None:
    certs = mtls_redis.certs
    error = await fails_at_once(with_files(mtls_redis, ca=certs.other_ca, cert=certs.cert, key=certs.key))
    assert "does not trust" in error and str(certs.other_ca) in error


async def test_a_host_the_server_certificate_does_not_list_fails_at_once(tls_redis: TlsRedis) -> None:
    # The certificate lists IP:127.0.0.1 only.
    error = await fails_at_once(tls_redis.url.replace("127.0.0.1", "localhost"))
    assert "not valid for localhost" in error and "a name the certificate lists" in error


async def test_a_client_certificate_of_another_ca_is_refused_at_once(mtls_redis: TlsRedis) -> None:
    certs = mtls_redis.certs
    error = await fails_at_once(with_files(mtls_redis, ca=certs.ca, cert=certs.rogue_cert, key=certs.key))
    assert f"refused this client's TLS certificate {certs.rogue_cert}" in error
    assert "not signed by a CA the server trusts" in error


@pytest.mark.parametrize(("files", "says"), [
    (lambda c, missing: {"ca": missing}, "cannot read the TLS CA file"),
    (lambda c, missing: {"ca": c.ca, "cert": missing, "key": c.key}, "cannot read the TLS client certificate"),
    (lambda c, missing: {"ca": c.ca, "cert": c.cert, "key": missing}, "cannot read the TLS client key"),
    (lambda c, missing: {"ca": c.ca, "cert": c.cert, "key": c.ca.with_suffix(".key")},
     "the key is not the certificate's"),
], ids=["ca", "cert", "key", "key-of-another"])
async def test_a_tls_file_that_does_not_load_fails_at_once_naming_it(
        mtls_redis: TlsRedis, tmp_path: Path, files: Callable[[TlsCerts, Path], dict[str, Path]], says: str) -> None:
    given = files(mtls_redis.certs, tmp_path / "no-such.pem")
    error = await fails_at_once(with_files(mtls_redis, **given))
    assert says in error
    assert "PRIVATE KEY" not in error  # a path may show; a key's contents never


async def test_an_encrypted_key_needs_its_password_and_never_prompts_for_it(mtls_redis: TlsRedis,
                                                                           tmp_path: Path) -> None:
    # Without a password OpenSSL would ask for it on the terminal, and a role would hang there.
    certs = mtls_redis.certs
    key = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "ec", "-in", str(certs.key), "-aes256", "-passout", "pass:pw", "-out", str(key)],
                   check=True, capture_output=True, timeout=30)
    url = with_files(mtls_redis, ca=certs.ca, cert=certs.cert, key=key)
    assert "an encrypted key" in await fails_at_once(url)
    assert "a wrong ssl_password" in await fails_at_once(f"{url}&ssl_password=wrong")
    client = connect(f"{url}&ssl_password=pw")  # the node client takes the key's password in the URL
    try:
        await wait_ready(client, url, timeout=5)
    finally:
        await client.aclose()


def test_the_tls_settings_are_written_into_the_url(tls_certs: TlsCerts) -> None:
    settings = Settings.from_env({"REDIS_URL": "rediss://u:secret@h:6380/0", "IB_REDIS_TLS_CA": str(tls_certs.ca),
                                  "IB_REDIS_TLS_CERT": str(tls_certs.cert), "IB_REDIS_TLS_KEY": str(tls_certs.key)})
    kwargs = parse_url(settings.redis_url or "")
    assert (kwargs["host"], kwargs["password"]) == ("h", "secret")
    assert {k: v for k, v in kwargs.items() if k.startswith("ssl_")} == {
        "ssl_ca_certs": str(tls_certs.ca), "ssl_certfile": str(tls_certs.cert), "ssl_keyfile": str(tls_certs.key)}
    # Settings made again from these (as `up` hands the URL to its roles with the same environment) agree.
    assert Settings(redis_url=settings.redis_url, redis_tls_ca=tls_certs.ca).redis_url == settings.redis_url
    odd = Path("/etc/ib tls/50%+1/ca.pem")  # redis-py unquotes query values twice
    assert parse_url(Settings(redis_url="rediss://h", redis_tls_ca=odd).redis_url or "")["ssl_ca_certs"] == str(odd)


@pytest.mark.parametrize(("url", "env", "says"), [
    ("redis://h:6379/0", {"IB_REDIS_TLS_CA": "/ca.pem"}, "without TLS"),
    ("rediss://h:6380/0?ssl_ca_certs=/a.pem", {"IB_REDIS_TLS_CA": "/b.pem"}, "disagree"),
    ("rediss://h:6380/0", {"IB_REDIS_TLS_KEY": "/k.pem"}, "needs its certificate"),
], ids=["plaintext", "two-cas", "key-alone"])
def test_tls_settings_that_cannot_work_are_refused_with_one_line(url: str, env: dict[str, str], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Settings.from_env({"REDIS_URL": url, **env})
    # A URL that comes later (the one `up` recorded) meets the settings in a replace: still one line.
    settings = Settings.from_env(env)
    with pytest.raises(RedisMisconfigured, match=says):
        msgspec.structs.replace(settings, redis_url=url)


@pytest.mark.parametrize(("url", "says"), [
    ("redis://h:6379/0?ssl_ca_certs=/ca.pem", "needs TLS"),
    ("rediss+cluster://h:6380/0?ssl_password=pw", "the cluster client (rediss+cluster://) does not take"),
    ("rediss://h:6380/0?ssl_certfle=/c.pem", "does not take ?ssl_certfle="),
], ids=["plaintext", "cluster-password", "typo"])
def test_url_tls_options_redis_py_would_refuse_fail_at_connect(url: str, says: str) -> None:
    # redis-py raises a TypeError (a traceback) at the first connection for each of these.
    with pytest.raises(RedisMisconfigured, match=re.escape(says)) as caught:
        connect(url)
    assert "\n" not in str(caught.value) and "pw" not in str(caught.value)


def test_a_key_password_is_redacted() -> None:
    url = "rediss://h:6380/0?ssl_keyfile=/k.pem&ssl_password=sekret"
    assert "sekret" not in redacted(url) and "/k.pem" in redacted(url)
    assert "sekret" not in logs.scrub(f"connecting to {url}")
