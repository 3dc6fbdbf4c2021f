"""Commands that run and check the roles: ``up``, ``policy``, ``worker``, ``health``, ``config``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import click

from broker.connection import redacted
from cli.common import (
    EPILOG,
    check_redis,
    cluster_options,
    common,
    gateway_options,
    local_cluster,
    local_gateway,
    metrics_port_option,
    need_url,
    pool_workers,
    settings_from,
    sigterm_is_interrupt,
    workers_option,
)
from cli.stack import state_file, write_state


@click.command(epilog=EPILOG)
@common
@workers_option
@cluster_options
@metrics_port_option("Serve each role's /metrics, /healthz and /readyz on consecutive ports from PORT: "
                     "the policy worker on PORT, the workers on PORT+1 and up [env IB_METRICS_PORT; default: off].")
@gateway_options
def up(worker_counts: tuple[str, ...], cluster_primaries: int | None, replicas: int | None,
       metrics_port: int | None, gateway_port: int, no_gateway: bool, **opts: Any) -> None:
    """Run the policy worker, every configured pool's workers and the OpenAI-compatible gateway
    as processes until Ctrl-C or SIGTERM.

    Without --redis-url an embedded redis-server is started (AOF on) and stopped at exit, or
    with --cluster N a local Redis Cluster of N primaries; other commands in other terminals
    find it (and its shard count) without flags. The gateway listens on 127.0.0.1 with the
    API keys of IB_GATEWAY_KEYS_FILE or IB_GATEWAY_KEYS, or without keys when neither is set.
    """
    from cli.stack import Stack

    settings = settings_from(**opts, metrics_port=metrics_port)
    settings, cluster = local_cluster(settings, cluster_primaries, replicas)
    workers = pool_workers(settings, worker_counts)
    if settings.redis_url:
        check_redis(settings.redis_url)
    gateway = None if no_gateway else local_gateway(gateway_port)
    stack = Stack(settings, workers=workers, cluster=cluster, gateway=gateway)
    state = state_file()
    sigterm_is_interrupt()
    try:
        stack.start()
        if stack.cluster is not None:
            for line in stack.cluster.describe(settings.topology):
                click.echo(line, err=True)
        if not settings.redis_url:
            write_state(stack.url, settings.shards)
        stack.wait_ready()
        pools = ", ".join(f"{n} {pool} worker(s)" for pool, n in workers.items())
        shards = f", {settings.shards} shards" if settings.shards > 1 else ""
        click.secho(f"stack up on {redacted(stack.url)} (prefix {settings.prefix!r}{shards}): policy, {pools}",
                    fg="green", err=True)
        click.echo("  try:  inference-broker submit --prompt 'Hello'    (Ctrl-C stops the stack)", err=True)
        if gateway is not None:
            keys = "API keys of IB_GATEWAY_KEYS(_FILE)" if gateway.keyed else "no API keys: any key works"
            click.echo(f"  OpenAI API: {gateway.url}  ({keys})", err=True)
        if stack.metrics_ports and settings.metrics_port:
            ports = ", ".join(f"{label} :{port}" for label, port in stack.metrics_ports.items())
            click.echo(f"  metrics and health (/metrics, /healthz, /readyz): {ports}", err=True)
        while True:
            stack.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("stopping...", err=True)
    finally:
        stack.stop()
        if not settings.redis_url:
            state.unlink(missing_ok=True)


@click.command(epilog=EPILOG)
@common
@click.option("--name", help="Consumer name (default: unique per process). Reuse it to recover this "
                             "worker's pending entries after a restart.")
@metrics_port_option("Serve /metrics, /healthz and /readyz on this port [env IB_METRICS_PORT; default: off].")
def policy(name: str | None, metrics_port: int | None, **opts: Any) -> None:
    """Run one policy worker: classify jobs, route them to pools."""
    from cli import roles

    settings = need_url(settings_from(**opts, metrics_port=metrics_port))
    roles.run(lambda stop: roles.serve_policy(settings, stop, name))


@click.command(epilog=EPILOG)
@common
@click.option("--pool", required=True, help="Pool to serve, as named in the policy config (gpu or accel by default).")
@click.option("--concurrency", type=click.IntRange(min=1), help="Jobs run at once (default: the pool's).")
@click.option("--name", help="Consumer name (default: unique per process).")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True, envvar="IB_GRACE_S",
              help="Seconds running jobs get to finish on SIGTERM [env IB_GRACE_S].")
@metrics_port_option("Serve /metrics, /healthz and /readyz on this port [env IB_METRICS_PORT; default: off].")
def worker(pool: str, concurrency: int | None, name: str | None, grace: float, metrics_port: int | None,
           **opts: Any) -> None:
    """Run one worker of a pool on the pool's backend: a simulated device, OpenAI-compatible
    endpoints or an in-process model.

    The backend is set per pool in the policy config (docs/backends.md).
    """
    from cli import roles

    settings = need_url(settings_from(**opts, grace_s=grace, metrics_port=metrics_port))
    roles.run(lambda stop: roles.serve_worker(settings, stop, pool, concurrency=concurrency, name=name))


@click.command(epilog=EPILOG)
@common
@click.option("--policy", "role_policy", is_flag=True, help="Check this host's policy worker.")
@click.option("--pool", help="Check this host's worker of pool NAME.")
@click.option("--max-age", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds after which a heartbeat counts as stale.")
@click.option("--metrics-port", "ready_port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Instead: ask the role serving --metrics-port PORT on this host whether it is ready "
                   "(GET /readyz: Redis reachable, its groups in place). Needs no Redis URL.")
def health(role_policy: bool, pool: str | None, max_age: float, ready_port: int | None, **opts: Any) -> None:
    """Exit 0 if a role on this host is healthy (for container healthchecks).

    With --metrics-port, asks the role's own /readyz endpoint. Otherwise looks for a
    fresh heartbeat from a role on this host (roles name themselves after it); without
    --policy or --pool it only checks that Redis answers.
    """
    import socket

    from broker.connection import connect
    from broker.heartbeats import decoder_of, read_beats

    if ready_port is not None:
        settings_from(**opts)  # logging only: the endpoint answers for the role's Redis
        _check_ready(ready_port)
        return
    settings = need_url(settings_from(**opts))
    key = settings.topology.policy_heartbeats if role_policy else settings.topology.heartbeats(pool or "")

    async def heartbeats() -> dict[bytes, bytes] | None:
        client = connect(settings.redis_url or "")
        try:
            await client.ping()  # type: ignore[misc]
            return await client.hgetall(key) if role_policy or pool else None  # type: ignore[misc]
        finally:
            await client.aclose()

    beats = asyncio.run(heartbeats())
    if beats is None:
        click.echo("redis ok")
        return
    host = f"-{socket.gethostname()}-"
    now = time.time()
    for name, beat in read_beats(beats, decoder_of(settings.topology, key), key).items():
        if host in name.decode(errors="replace") and now - beat.ts < max_age:
            click.echo(f"{name.decode()} ok")
            return
    role = "policy worker" if role_policy else f"{pool} worker"
    raise click.ClickException(f"no fresh heartbeat from a {role} on this host in the last {max_age:g} s; "
                               f"try: check that the {role} runs (its log says why it stopped)")


def _check_ready(port: int) -> None:
    """GET /readyz on 127.0.0.1:``port``; print the role's answer, raise unless it is ready."""
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace").strip()
        raise click.ClickException(f"not ready ({exc.code}): {body}") from None
    except OSError as exc:
        raise click.ClickException(f"no role answers on {url}: {exc}") from None
    click.echo(f"ready: {body}")


@click.command("config", epilog=EPILOG)
@click.argument("path", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def config_cmd(path: Path | None) -> None:
    """Check a policy TOML file, or print the built-in default one to start from."""
    from broker.config import default_config_text, load_config

    if path is None:
        click.echo(default_config_text(), nl=False)
        return
    cfg = load_config(path)
    click.secho(f"{path}: ok ({len(cfg.classes)} classes, {len(cfg.rules)} rules, pools: "
                f"{', '.join(cfg.pools)})", fg="green")
