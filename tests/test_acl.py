"""Least-privilege ACL users (broker/acl.py, ``inference-broker acl``) on a real redis-server.

The server is this module's own (the session's has no users and stays untouched). Each test
applies the rules of its own deployment (its prefix, two tenants) under user names of its
own. Every role runs under its user, as real processes where it is one, with its URL in the
environment; what a role must not do is refused by Redis itself (NOPERM), which ``ACL LOG``
records: a run of the whole pipeline leaves no other entry there.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from click.testing import CliRunner
from redis.exceptions import NoPermissionError

from broker import acl
from broker.client import Client
from broker.config import default_config_text
from broker.scripts import SUBMIT, Scripts
from broker.topology import Topology
from broker.wire import Job, Result, decode_result, encode_job, json_encode
from cli.acl import PLACEHOLDER, render, role_url
from cli.embedded import EmbeddedRedis
from cli.main import main
from tests.conftest import ROOT, Roles, _start
from tests.gateway_proc import KEY, start_gateway
from tests.helpers import admitting_all, eventually

TENANTS = ("acme", "beta")


@pytest.fixture(scope="module")
def acl_server() -> Iterator[EmbeddedRedis]:
    """A redis-server of this module's own: its default user is the admin that applies the rules."""
    server = _start()
    yield server
    server.stop()


class Users:
    """A deployment's ACL users on ``acl_server``: each role's URL, and the admin client."""

    def __init__(self, server: EmbeddedRedis, deployment: acl.Deployment) -> None:
        self.server = server
        self.deployment = deployment
        self.roles = {r.user.removeprefix(deployment.user_prefix): r for r in acl.roles(deployment)}
        self.passwords = {name: acl.new_password() for name in self.roles}
        self.admin = aioredis.Redis.from_url(server.url)

    async def apply(self) -> None:
        for name, role in self.roles.items():
            rule = role.rule(acl.password_hash(self.passwords[name]))
            await self.admin.execute_command("ACL", "SETUSER", *rule)  # type: ignore[no-untyped-call]

    def url(self, name: str) -> str:
        """The URL of role ``name`` (``producer-acme``, ``worker-gpu``, ``policy``...)."""
        return role_url(self.server.url, self.roles[name].user, self.passwords[name])

    def client(self, name: str) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url(name))

    async def denials(self) -> list[tuple[str, str, str]]:
        """``ACL LOG`` entries of this deployment's users: (user, reason, object)."""
        entries = await self.admin.acl_log(count=1000)
        return [(e["username"], e["reason"], e["object"]) for e in entries
                if e["username"].startswith(self.deployment.user_prefix)]


@pytest_asyncio.fixture
async def users(acl_server: EmbeddedRedis, prefix: str) -> AsyncIterator[Users]:
    found = Users(acl_server, acl.Deployment(prefix=prefix, pools=("gpu", "accel"), tenants=TENANTS,
                                             users=f"{prefix}-"))
    await found.apply()
    yield found
    await found.admin.acl_deluser(*(r.user for r in found.roles.values()))
    await found.admin.aclose()


class EnvRoles(Roles):
    """Roles whose Redis URL (and its password) travels in REDIS_URL, never on the command line."""

    def __init__(self, users: Users, log_dir: Path) -> None:
        super().__init__(users.server.url, users.deployment.prefix, log_dir)
        self.users = users

    @property
    def options(self) -> list[str]:
        return ["--prefix", self.prefix]

    def as_user(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.start(*args, env={**(env or {}), "REDIS_URL": self.users.url(name)})


@pytest.fixture
def env_roles(users: Users, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EnvRoles]:
    roles = EnvRoles(users, tmp_path)
    yield roles
    roles.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(roles.logs())


# The rules themselves.

def test_every_role_starts_from_nothing_and_gets_only_named_commands_and_keys() -> None:
    deployment = acl.Deployment(prefix="ib", pools=("gpu", "accel"), tenants=TENANTS)
    roles = acl.roles(deployment)
    assert [r.user for r in roles] == ["ib-producer", "ib-producer-acme", "ib-producer-beta", "ib-gateway",
                                       "ib-policy", "ib-worker-gpu", "ib-worker-accel", "ib-operator", "ib-metrics"]
    for role in roles:
        rule = role.rule("ab" * 32)
        assert rule[:7] == [role.user, "reset", "on", "#" + "ab" * 32, "resetkeys", "resetchannels", "-@all"]
        granted = rule[7:]
        assert all(g.startswith("+") and "@" not in g and g[1:].islower() for g in granted if g.startswith("+"))
        assert not {"allkeys", "allcommands", "nopass", "~*", "+@all", "&*"} & set(granted)
        assert all(k.split("~", 1)[1].startswith("ib:{ib}:") for k in granted if "~" in k[:3])
        assert not {"+flushall", "+flushdb", "+config", "+keys", "+acl", "+debug", "+shutdown"} & set(granted)


def test_a_tenants_producer_has_its_own_keys_and_nothing_else() -> None:
    deployment = acl.Deployment(prefix="ib", shards=3, pools=("gpu",), tenants=TENANTS)
    acme = acl.producer(deployment, "acme")
    assert acme.user == "ib-producer-acme"
    # The ingress is read-write: SUBMIT takes it in KEYS, which EVALSHA checks for both.
    assert set(acme.keys) == {"~ib:{ib.*}:~acme:jobs", "%R~ib:{ib.*}:~acme:done:*", "%R~ib:{ib.*}:~acme:tokens:*",
                              "~ib:{ib.*}:~acme:r:*"}
    assert not {"+set", "+del", "+xdel", "+xtrim", "+scan", "+keys"} & {f"+{c}" for c in acme.commands}
    default = acl.producer(deployment, None)
    assert set(default.keys) == {"~ib:{ib.*}:jobs", "%R~ib:{ib.*}:done:*", "%R~ib:{ib.*}:tokens:*",
                                 "~ib:{ib.*}:results", "~ib:{ib.*}:batches"}


def test_bad_names_are_refused() -> None:
    for bad in ({"tenants": ("default",)}, {"tenants": ("a.b",)}, {"pools": ("gpu*",)}, {"replies": ("jobs",)},
                {"prefix": "a b"}):
        with pytest.raises(ValueError):
            acl.Deployment(**bad)


def test_text_rules_fit_80_columns_with_a_comment_per_role() -> None:
    for role in acl.roles(acl.Deployment(prefix="ib", shards=16, pools=("gpu", "accel"), tenants=TENANTS)):
        text = render(role, "0" * 64, "text")
        assert text.startswith(f"# {role.user}: ")
        assert max(len(line) for line in text.splitlines()) <= 80, text
        body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        unwrapped = body.replace(" \\\n  ", " ").strip()
        assert unwrapped == "ACL SETUSER " + " ".join(role.rule("0" * 64)), text
        assert render(role, "0" * 64, "commands") == "ACL SETUSER " + " ".join(role.rule("0" * 64))


def test_role_url_replaces_the_admin_credentials() -> None:
    url = role_url("rediss://admin:secret@redis.example:6380/0?ssl_ca_certs=/ca.pem&password=x",
                   "ib-worker-gpu", "p/w")
    assert url == "rediss://ib-worker-gpu:p%2Fw@redis.example:6380/0?ssl_ca_certs=%2Fca.pem"


# The command.

def test_acl_command_prints_rules_with_placeholder_hashes_without_a_secrets_dir() -> None:
    out = CliRunner().invoke(main, ["acl", "--prefix", "ib", "--tenant", "acme"], env={"REDIS_URL": ""})
    assert out.exit_code == 0, out.output
    assert "ACL SETUSER ib-producer-acme reset on #" + PLACEHOLDER in out.output
    assert max(len(line) for line in out.output.splitlines()) <= 80
    bad = CliRunner().invoke(main, ["acl", "--tenant", "default"], env={"REDIS_URL": ""})
    assert bad.exit_code == 2 and "not 'default'" in bad.output


def test_acl_apply_writes_0600_urls_keeps_passwords_and_each_url_logs_in(
        acl_server: EmbeddedRedis, prefix: str, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    args = ["acl", "--prefix", prefix, "--tenant", "acme", "--secrets-dir", str(secrets), "--apply"]
    env = {"REDIS_URL": acl_server.url, "IB_CONFIG": ""}
    out = CliRunner().invoke(main, args, env=env)
    assert out.exit_code == 0, out.output
    assert "no aclfile" in out.output and "operator's job" in out.output
    files = sorted(p.name for p in secrets.iterdir())
    assert files == sorted(f"{prefix}-{r}.url" for r in ("producer", "producer-acme", "gateway", "policy",
                                                          "worker-gpu", "worker-accel", "operator", "metrics"))
    urls = {}
    for path in secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        urls[path.name] = path.read_text().strip()
        assert urls[path.name].split("@")[0].split(":")[-1] not in out.output  # no password printed
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    again = CliRunner().invoke(main, args, env=env)
    assert again.exit_code == 0, again.output
    assert {p.name: p.read_text().strip() for p in secrets.iterdir()} == urls  # passwords kept
    admin = redis.Redis.from_url(acl_server.url)
    try:
        for url in urls.values():
            with redis.Redis.from_url(url) as user:
                assert user.ping()
        with redis.Redis.from_url(urls[f"{prefix}-producer-acme.url"]) as acme, pytest.raises(NoPermissionError):
            acme.get(f"{prefix}:{{{prefix}}}:~beta:done:x")
    finally:
        admin.acl_deluser(*(name.removesuffix(".url") for name in urls))
        admin.close()
    refused = CliRunner().invoke(main, ["acl", "--apply"], env={"REDIS_URL": acl_server.url})
    assert refused.exit_code == 2 and "--secrets-dir" in refused.output


def test_acl_is_in_the_command_list() -> None:
    out = CliRunner().invoke(main, ["--help"])
    assert " acl " in out.output


# Refusals by Redis, with each role's own user.

async def test_a_tenant_cannot_touch_another_tenants_keys_or_the_shared_streams(users: Users) -> None:
    base = f"{users.deployment.prefix}:{{{users.deployment.prefix}}}:"
    acme = users.client("producer-acme")
    try:
        for attempt in (acme.get(f"{base}~beta:done:j1"),                     # B's result
                        acme.xread({f"{base}~beta:tokens:j1": "0"}),          # B's token stream
                        acme.xread({f"{base}~beta:r:results": "0"}),          # B's reply stream
                        acme.xadd(f"{base}~beta:jobs", {"job": "{}"}),         # B's ingress
                        acme.xadd(f"{base}~beta:r:results", {"result": "{}"}),  # B's reply stream
                        acme.xadd(f"{base}pool:gpu", {"routed": "{}"}),        # a pool, skipping the policy
                        acme.xread({f"{base}dead": "0"}),                      # the dead letters
                        acme.xread({f"{base}jobs": "0"}),                      # the default space
                        acme.get(f"{base}done:j1")):
            with pytest.raises(NoPermissionError):
                await attempt
        # Its own space it may use (nothing there yet).
        assert await acme.get(f"{base}~acme:done:j1") is None
        assert await acme.xread({f"{base}~acme:r:results": "0"}) == []
        # What it may not run at all, whatever the key.
        for command in (("XDEL", f"{base}~acme:jobs", "0-1"), ("DEL", f"{base}~acme:jobs"), ("KEYS", "*"),
                        ("FLUSHALL",), ("CONFIG", "GET", "requirepass"), ("XTRIM", f"{base}~acme:jobs", "MAXLEN", "0")):
            with pytest.raises(NoPermissionError):
                await acme.execute_command(*command)  # type: ignore[no-untyped-call]
        # No Lua of its own (a loop would block Redis for every tenant): the broker's loaded
        # scripts only, by SHA.
        for command in (("EVAL", "while true do end", "0"), ("SCRIPT", "LOAD", "return 1")):
            with pytest.raises(NoPermissionError):
                await acme.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await acme.aclose()
    denied = {user for user, _reason, _object in await users.denials()}
    assert denied == {users.roles["producer-acme"].user}


async def test_a_pool_worker_cannot_read_the_ingress_or_other_pools_nor_the_metrics_reader_write(
        users: Users) -> None:
    base = f"{users.deployment.prefix}:{{{users.deployment.prefix}}}:"
    gpu, reader = users.client("worker-gpu"), users.client("metrics")
    try:
        for attempt in (gpu.xread({f"{base}jobs": "0"}), gpu.xread({f"{base}~acme:jobs": "0"}),
                        gpu.xread({f"{base}pool:accel": "0"}), gpu.xread({f"{base}pool:accel:1": "0"}),
                        gpu.xadd(f"{base}~acme:jobs", {"job": "{}"}), gpu.get(f"{base}~acme:done:j1"),
                        # It writes results, never deletes them nor the dead letters.
                        gpu.delete(f"{base}~acme:done:j1"), gpu.xdel(f"{base}dead", "0-1"),
                        gpu.execute_command("XTRIM", f"{base}~acme:r:results", "MAXLEN", "0"),  # type: ignore[no-untyped-call]
                        reader.xadd(f"{base}~acme:jobs", {"job": "{}"}), reader.xadd(f"{base}results", {"a": "b"}),
                        reader.xrange(f"{base}~acme:done:j1"), reader.get(f"{base}~acme:done:j1"),
                        # Sizes of the ingress, the lanes, the dead letters, but not their jobs.
                        reader.xrange(f"{base}~acme:jobs"), reader.xrange(f"{base}pool:gpu"),
                        reader.xrevrange(f"{base}dead"),
                        reader.execute_command("XTRIM", f"{base}dead", "MAXLEN", "0")):  # type: ignore[no-untyped-call]
            with pytest.raises(NoPermissionError):
                await attempt
        assert await reader.xlen(f"{base}~acme:jobs") == 0
        assert await reader.xlen(f"{base}dead") == 0
        assert await reader.xrange(f"{base}~acme:r:results") == []  # the results, it reads
    finally:
        await gpu.aclose()
        await reader.aclose()


# Every role at work under its own user.

@pytest.mark.skipif(sys.platform != "linux", reason="role processes")
async def test_default_space_roles_work_under_their_own_users(users: Users, env_roles: EnvRoles) -> None:
    prefix = users.deployment.prefix
    env_roles.as_user("policy", "policy", env=FAST_ROLE_ENV)
    for pool in ("gpu", "accel"):
        env_roles.as_user(f"worker-{pool}", "worker", "--pool", pool, "--grace", "5", env=FAST_ROLE_ENV)
    jobs = [Job.chat("llama-3.1-8b", "hi", max_tokens=4) for _ in range(6)]
    streamed = Job.chat("llama-3.1-8b", "hi", max_tokens=4, stream=True)
    async with Client(users.url("producer"), prefix=prefix) as sdk:
        await sdk.submit_many([*jobs, streamed])
        chunks = [c async for c in sdk.tokens(streamed.id, timeout=30)]
        results = [await sdk.result(j.id, timeout=30) for j in [*jobs, streamed]]
        unknown = Job.chat("no-such-model", "hi")
        await sdk.submit(unknown)
        failed = await sdk.result(unknown.id, timeout=30)
    assert chunks and all(r.status == "ok" for r in results), results
    assert failed.status == "failed"
    async def dead_letters() -> None:
        code, out = await run_cli(users, "operator", "dead", "list")
        assert code == 0 and "unknown_model" in out, out
        for args in (("dead", "replay", "--all"), ("dead", "purge", "--yes")):
            code, out = await run_cli(users, "operator", *args)
            assert code == 0, (args, out)

    async def gateway() -> None:
        proc = await start_gateway(env_roles, env_roles.log_dir,
                                   env={**FAST_ROLE_ENV, "REDIS_URL": users.url("gateway")})
        openai = proc.openai(KEY)
        reply = await openai.chat.completions.create(model="llama-3.1-8b", max_tokens=4,
                                                     messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        stream = await openai.chat.completions.create(model="llama-3.1-8b", max_tokens=4, stream=True,
                                                      messages=[{"role": "user", "content": "hi"}])
        assert [c.id async for c in stream]
        await openai.close()

    # Each role's commands at once (a process each): they touch different keys.
    commands = asyncio.gather(
        run_cli(users, "operator", "results"), run_cli(users, "operator", "result", jobs[0].id),
        run_cli(users, "operator", "cancel", jobs[0].id), run_cli(users, "metrics", "top", "--once"),
        run_cli(users, "worker-gpu", "health", "--pool", "gpu"), run_cli(users, "policy", "health", "--policy"))
    _, _, (listed, result, cancel, top, *healthy) = await asyncio.gather(dead_letters(), gateway(), commands)
    assert listed[0] == 0 and jobs[0].id in listed[1], listed
    assert result[0] == 0 and "ok" in result[1], result
    assert cancel[0] == 2 and "not cancelled" in cancel[1], cancel  # it had finished: looked up, not refused
    assert top[0] == 0 and "gpu" in top[1], top
    assert [code for code, _ in healthy] == [0, 0], healthy  # each role's health check, as itself
    # Only a producer that submitted before the roles had loaded the scripts was refused: its
    # try to load them (it then added the jobs itself, see the test below).
    producer = users.roles["producer"].user
    assert {d for d in await users.denials() if d[:1] != (producer,)} == set()
    assert {what for user, _reason, what in await users.denials()} <= {"eval", "script|load"}


async def run_cli(users: Users, name: str, *args: str) -> tuple[int, str]:
    """``python -m cli <args>`` as role ``name`` (its URL in REDIS_URL): exit status and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, "--prefix", users.deployment.prefix, cwd=ROOT,
        env={**os.environ, "REDIS_URL": users.url(name), "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


FAST_ROLE_ENV = {"IB_BLOCK_MS": "200", "IB_HEARTBEAT_S": "0.2", "IB_SNAPSHOT_S": "0.05", "IB_CLAIM_IDLE_MS": "1000"}


TENANT_TABLES = "\n[tenants.acme]\n\n[tenants.beta]\n"


def chat(job_id: str, **fields: object) -> Job:
    return Job.chat("llama-3.1-8b", f"hello from {job_id}", id=job_id, max_tokens=4, **fields)


async def test_two_tenants_under_their_own_users_are_refused_every_way_into_each_other(
        users: Users, env_roles: EnvRoles, tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(admitting_all(default_config_text()) + TENANT_TABLES)
    env = {**FAST_ROLE_ENV, "IB_CONFIG": str(config), "IB_FAULT_INJECTION": "1", "IB_MAX_DELIVERIES": "2",
           "IB_RETRY_BACKOFF_MS": "50", "IB_CLAIM_INTERVAL_S": "0.2"}
    env_roles.as_user("policy", "policy", env=env)
    for pool in ("gpu", "accel"):
        env_roles.as_user(f"worker-{pool}", "worker", "--pool", pool, "--grace", "5", env=env)
    prefix = users.deployment.prefix
    topo = Topology(prefix)
    acme_keys, beta_keys = topo.of_tenant("acme"), topo.of_tenant("beta")
    raw_acme, raw_beta = users.client("producer-acme"), users.client("producer-beta")
    async with (Client(users.url("producer-acme"), prefix=prefix, tenant="acme") as acme,
                Client(users.url("producer-beta"), prefix=prefix, tenant="beta") as beta):
        # Failures at the worker (NACK, a claim, DEAD) in acme's space, under the worker's user.
        await acme.submit_many([chat("flaky", metadata={"fault": "transient"}),
                                chat("broken", metadata={"fault": "permanent"})])
        # Id squatting: acme takes the id first, and beta's job of that id still runs, as beta's.
        await acme.submit(chat("shared", stream=True))
        first = await acme.result("shared", timeout=30)
        tokens = [c async for c in acme.tokens("shared", timeout=30)]
        await beta.submit(chat("shared"))
        second = await beta.result("shared", timeout=30)
        assert (first.status, first.tenant, second.status, second.tenant) == ("ok", "acme", "ok", "beta")
        assert tokens and tokens[-1].end == "ok"

        # A forged tenant field, written straight to acme's own ingress with acme's credentials.
        await raw_acme.xadd(acme_keys.jobs, {"job": encode_job(chat("forged", tenant="beta"))})
        forged = await acme.result("forged", timeout=30)
        assert forged.status == "failed" and forged.tenant == "acme" and "forged_tenant" in (forged.error or "")

        # A replay: acme's finished job again (no second run), and beta sending a copy of it.
        await acme.submit(chat("shared", stream=True))
        await beta.submit(chat("copied", tenant="acme"))
        copied = await beta.result("copied", timeout=30)
        assert copied.status == "failed" and copied.tenant == "beta" and "forged_tenant" in (copied.error or "")
        await acme.submit(chat("after"))  # behind the replay on acme's ingress: once it has run, so has that
        assert (await acme.result("after", timeout=30)).status == "ok"

        # reply_to names a stream of the sender's own space, whatever the name.
        await acme.submit(chat("inbox", reply_to="beta-inbox"))
        assert (await acme.result("inbox", reply_to="beta-inbox", timeout=30)).tenant == "acme"
        flaky, broken = await acme.result("flaky", timeout=30), await acme.result("broken", timeout=30)
        assert (flaky.status, broken.status, flaky.tenant) == ("failed", "failed", "acme"), (flaky, broken)
    try:
        admin = users.admin  # looks, with every right
        results = [decode_result(f[b"result"]).id for _, f in await admin.xrange(acme_keys.reply("results"))]
        assert sorted(results) == ["after", "broken", "flaky", "forged", "shared"]  # one result of "shared"
        assert [decode_result(f[b"result"]).id for _, f in await admin.xrange(beta_keys.reply("results"))] == [
            "shared", "copied"]
        assert len(await admin.xrange(acme_keys.reply("beta-inbox"))) == 1
        assert not await admin.exists(beta_keys.reply("beta-inbox"), topo.reply("beta-inbox"),
                                            beta_keys.done("forged"), acme_keys.done("copied"))
        # Each tenant's credentials reach nothing of the other's, even what it knows the name of.
        for attempt in (raw_beta.get(acme_keys.done("shared")), raw_beta.xread({acme_keys.tokens("shared"): "0"}),
                        raw_beta.xread({acme_keys.reply("beta-inbox"): "0"}),
                        raw_beta.xadd(acme_keys.reply("results"), {"result": "{}"})):
            with pytest.raises(NoPermissionError):
                await attempt
    finally:
        await raw_acme.aclose()
        await raw_beta.aclose()
    provoked = await users.denials()
    assert {user for user, _, _ in provoked} == {users.roles["producer-beta"].user} and len(provoked) == 4
    await users.admin.acl_log_reset()

    (code, out), top, result, listed = await asyncio.gather(
        run_cli(users, "operator", "dead", "list"), run_cli(users, "metrics", "top", "--once"),
        run_cli(users, "producer-acme", "result", "--tenant", "acme", "shared"),
        run_cli(users, "producer-acme", "results", "--tenant", "acme"))
    assert code == 0 and "4 dead letter(s)" in out and out.count("forged_tenant") == 2, out
    assert "max_deliveries" in out and "backend_error" in out, out
    assert top[0] == 0 and "gpu" in top[1], top
    assert result[0] == 0 and "job shared: ok" in result[1], result
    assert listed[0] == 0 and "after" in listed[1] and "copied" not in listed[1], listed
    assert await users.denials() == []  # every role did all it does with its own rights


def test_acl_apply_saves_to_the_aclfile_when_redis_has_one(tmp_path: Path) -> None:
    aclfile = tmp_path / "users.acl"
    aclfile.write_text("user default on nopass ~* &* +@all\n")
    server = EmbeddedRedis(directory=tmp_path / "redis", extra_args=("--aclfile", str(aclfile))).start()
    try:
        out = CliRunner().invoke(main, ["acl", "--prefix", "ib", "--secrets-dir", str(tmp_path / "s"), "--apply"],
                                 env={"REDIS_URL": server.url})
        assert out.exit_code == 0, out.output
        assert "ACL SAVE" in out.output and "no aclfile" not in out.output
        saved = aclfile.read_text()
        assert "user ib-producer on " in saved and "user ib-metrics on " in saved and "user default on nopass" in saved
    finally:
        server.stop()


def test_a_cluster_url_adds_what_the_cluster_client_sends() -> None:
    out = CliRunner().invoke(main, ["acl", "--format", "commands", "--shards", "3"], env={"REDIS_URL": ""})
    assert out.exit_code == 0 and all("+cluster|slots +command +asking" in line for line in out.output.splitlines())
    single = CliRunner().invoke(main, ["acl", "--format", "commands"], env={"REDIS_URL": ""})
    assert "cluster|slots" not in single.output


async def test_a_faststream_service_runs_as_a_tenants_producer(users: Users) -> None:
    from faststream import FastStream

    from broker.faststream import JobPublisher, ResultSubscriber, broker_for

    topo = Topology(users.deployment.prefix).of_tenant("acme")
    result = Result.for_job(chat("earlier"), "ok")
    await users.admin.xadd(topo.reply("results"), {"result": json_encode(result)})  # as a worker would
    broker = broker_for(users.url("producer-acme"))
    app = FastStream(broker)
    got: asyncio.Queue[str] = asyncio.Queue()
    subscriber = ResultSubscriber(app, broker, topo, group="billing", consumer="billing-1", claim_idle_ms=300)

    @subscriber
    async def on_result(r: Result) -> None:
        await got.put(r.id)

    publisher = JobPublisher(broker, topo)
    async def claims() -> int:
        stats = await users.admin.info("commandstats")
        return int(stats.get("cmdstat_xautoclaim", {}).get("calls", 0))

    claimed = await claims()
    await app.start()
    try:
        await publisher.publish(chat("published"))
        async with asyncio.timeout(10):
            assert await got.get() == "earlier"

        async def claimed_since() -> bool:
            return await claims() > claimed

        await eventually(claimed_since, timeout=10, what="a pass of its claim subscriber (XAUTOCLAIM)")
    finally:
        await app.stop()
    assert await users.admin.xlen(topo.jobs) == 1
    assert await users.denials() == []


async def test_a_producer_runs_no_lua_of_its_own_and_submits_when_redis_forgot_the_scripts(
        users: Users, env_roles: EnvRoles, tmp_path: Path) -> None:
    prefix = users.deployment.prefix
    await users.admin.script_flush()  # as a Redis that restarted empty, before any role started
    try:
        async with Client(users.url("producer-acme"), prefix=prefix, tenant="acme") as acme:
            # SUBMIT is refused (the user may not load it), so the SDK adds the job itself.
            assert await acme.submit(chat("early")) == "early"
            assert not (await users.admin.script_exists(SUBMIT.sha))[0]
            config = tmp_path / "policy.toml"
            config.write_text(admitting_all(default_config_text()) + TENANT_TABLES)
            env = {**FAST_ROLE_ENV, "IB_CONFIG": str(config)}
            env_roles.as_user("policy", "policy", env=env)
            env_roles.as_user("worker-gpu", "worker", "--pool", "gpu", "--grace", "5", env=env)
            assert (await acme.result("early", timeout=30)).status == "ok"
            # The roles loaded the scripts as they started: SUBMIT runs again.
            assert (await users.admin.script_exists(SUBMIT.sha))[0]
            assert await acme.submit(chat("later")) == "later"
            assert (await acme.result("later", timeout=30)).status == "ok"
    finally:
        await Scripts(users.admin).teach()  # for the module's other tests
