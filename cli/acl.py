"""``acl``: the least-privilege Redis ACL user of each role (broker/acl.py), printed or applied.

Passwords are generated here, kept only in ``--secrets-dir`` (one file per role, mode 0600)
and reach Redis as SHA-256 hashes: never on a command line, in the output or in a log. A
password already in the directory is kept, so applying again changes rules, not passwords;
deleting a role's file and applying again rotates its password.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import click

from broker import acl
from cli.common import EPILOG, common, need_url, settings_from

WIDTH = 80
PLACEHOLDER = "<sha256-of-password>"
"""The hash printed without --secrets-dir: Redis refuses it, so no such rule applies by mistake."""


@click.command("acl", epilog=EPILOG)
@common
@click.option("--tenant", "tenants", multiple=True, metavar="NAME",
              help="A tenant to make a producer user for; repeat per tenant [default: the [tenants.*] "
                   "of the policy config].")
@click.option("--reply-stream", "replies", multiple=True, metavar="NAME",
              help="A reply stream of the default space that producers and workers may use; repeat "
                   "per stream [default: IB_REPLY_STREAMS, else results and batches]. Give the policy "
                   "worker the same IB_REPLY_STREAMS, so that it refuses any other. (A tenant's are "
                   "all under its space.)")
@click.option("--secrets-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Keep each role's password in DIR/<user>.url (a redis:// URL for REDIS_URL=@FILE) or "
                   "DIR/<user>.password without a Redis URL; mode 0600. Existing ones are reused.")
@click.option("--apply", "apply_", is_flag=True,
              help="Run the rules on the Redis of --redis-url / REDIS_URL (an admin user), then ACL SAVE "
                   "if it has an aclfile. Needs --secrets-dir.")
@click.option("--format", "fmt", type=click.Choice(["text", "commands", "aclfile"]), default="text",
              show_default=True,
              help="text: a comment per role, wrapped at 80 columns; commands: one ACL SETUSER per line "
                   "(for redis-cli); aclfile: one 'user' line per role (for an aclfile).")
def acl_cmd(tenants: tuple[str, ...], replies: tuple[str, ...], secrets_dir: Path | None, apply_: bool,
            fmt: str, **opts: Any) -> None:
    """Print (or apply) a least-privilege Redis ACL user for each role.

    One user per role: a producer for the default space and one per tenant, the
    gateway, the policy worker, a worker per pool, the operator and the metrics
    reader. Each may run exactly the commands its role sends, on its own keys: a
    tenant's producer only adds to its own ingress and reads its own results.

    \b
    Hand each role its URL through the environment, never argv:
      inference-broker acl --secrets-dir /run/ib --apply
      REDIS_URL=@/run/ib/ib-worker-gpu.url inference-broker worker --pool gpu
    """
    from broker.config import load_config
    from broker.connection import is_cluster

    settings = settings_from(**opts)
    if apply_:
        settings = need_url(settings)  # the given URL, else a local stack's (`inference-broker up`)
    config = load_config(settings.config)
    try:
        deployment = acl.Deployment(
            prefix=settings.prefix, shards=settings.shards, pools=tuple(config.pools),
            tenants=tenants or tuple(config.tenants),
            replies=replies or tuple(sorted(settings.replies)) or ("results", "batches"),
            # A cluster URL, or with none a sharded deployment: its clients need the slot map.
            cluster=is_cluster(settings.redis_url) if settings.redis_url else settings.shards > 1)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if apply_ and (secrets_dir is None or not settings.redis_url):
        raise click.UsageError("--apply needs --secrets-dir DIR (the passwords go there, nowhere else) "
                               "and a Redis: --redis-url / REDIS_URL (an admin connection), or a local "
                               "stack's (`inference-broker up`)")
    roles = acl.roles(deployment)
    hashes = ({r.user: acl.password_hash(p) for r, p in _passwords(roles, secrets_dir, settings.redis_url)}
              if secrets_dir else {r.user: PLACEHOLDER for r in roles})
    if apply_:
        asyncio.run(_apply(settings.redis_url or "", roles, hashes))
        return
    if secrets_dir is None and fmt == "text":
        click.echo("# Passwords: --secrets-dir DIR makes them; these hashes are placeholders.\n")
    for role in roles:
        click.echo(render(role, hashes[role.user], fmt))


def render(role: acl.Role, password_hash: str, fmt: str) -> str:
    """One role's rule: commented and wrapped (text), or on one line for redis-cli or an aclfile."""
    rule = role.rule(password_hash)
    if fmt == "commands":
        return "ACL SETUSER " + " ".join(rule)
    if fmt == "aclfile":
        return "user " + " ".join(rule)
    comment = textwrap.fill(f"{role.user}: {role.summary}", WIDTH, initial_indent="# ", subsequent_indent="#   ")
    body = textwrap.fill(" ".join(["ACL SETUSER", *rule]), WIDTH - 2, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)
    return comment + "\n" + " \\\n".join(body.splitlines()) + "\n"


def role_url(admin_url: str, user: str, password: str) -> str:
    """``admin_url`` with ``user`` and ``password`` in place of its own credentials."""
    parts = urlsplit(admin_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if k not in ("username", "password")])
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}", query=query))


def _passwords(roles: list[acl.Role], directory: Path, url: str | None) -> list[tuple[acl.Role, str]]:
    """Each role's password: the one kept in ``directory``, else a new one written there."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = []
    for role in roles:
        password = _kept(directory, role.user) or acl.new_password()
        if url:
            _write(directory / f"{role.user}.url", role_url(url, role.user, password))
        else:
            _write(directory / f"{role.user}.password", password)
        found.append((role, password))
    return found


def _kept(directory: Path, user: str) -> str | None:
    url, plain = directory / f"{user}.url", directory / f"{user}.password"
    if url.exists():
        password = urlsplit(url.read_text(encoding="utf-8").strip()).password
        return unquote(password) if password else None
    return plain.read_text(encoding="utf-8").strip() or None if plain.exists() else None


def _write(path: Path, text: str) -> None:
    # Created 0600 (not chmod after): the secret is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)  # a file that existed keeps its old mode through O_CREAT


async def _apply(url: str, roles: list[acl.Role], hashes: dict[str, str]) -> None:
    from redis.asyncio.cluster import RedisCluster

    from broker.connection import connect

    admin = unquote(urlsplit(url).username or "default")
    if admin in hashes:
        raise click.UsageError(f"--redis-url logs in as {admin}, a user these rules replace; use an admin user")
    client = connect(url)
    try:
        # ACL rules are per node and not replicated: on a cluster, every node (replicas
        # included, for a failover) gets them, one node at a time (redis-py's ALL_NODES
        # target fails for ACL from the second call on).
        nodes: list[dict[str, Any]] = [{}]
        if isinstance(client, RedisCluster):
            await client.initialize()
            nodes = [{"target_nodes": node} for node in client.get_nodes()]
        for role in roles:
            for where in nodes:
                await client.execute_command(  # type: ignore[no-untyped-call]
                    "ACL", "SETUSER", *role.rule(hashes[role.user]), **where)
            click.echo(f"applied {role.user}")
        saved = 0
        for where in nodes:
            aclfile = await client.execute_command("CONFIG", "GET", "aclfile", **where)  # type: ignore[no-untyped-call]
            if _configured(aclfile):
                await client.execute_command("ACL", "SAVE", **where)  # type: ignore[no-untyped-call]
                saved += 1
        if saved:
            click.echo(f"saved to the aclfile (ACL SAVE) on {saved} of {len(nodes)} node(s)")
        if saved < len(nodes):
            click.echo(textwrap.fill("note: Redis has no aclfile, so these users live until it restarts; "
                                     "persisting them (CONFIG REWRITE into redis.conf, or an aclfile and "
                                     "ACL SAVE) is the operator's job", WIDTH))
    finally:
        await client.aclose()


def _configured(reply: object) -> bool:
    """Whether a node's CONFIG GET aclfile reply names a file."""
    if isinstance(reply, dict):
        return any(bool(v) for v in reply.values())
    return isinstance(reply, list) and len(reply) >= 2 and bool(reply[1])
