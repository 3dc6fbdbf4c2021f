"""``inference-broker gateway``: serve the OpenAI-compatible HTTP gateway; ``gateway hash-key``.

The server is uvicorn (uvloop, httptools; bench/GATEWAY.md says why not granian), run on
this process's event loop. On SIGTERM or Ctrl-C it stops accepting connections, lets
in-flight requests finish for up to ``--grace`` seconds (those still waiting then are cut,
and their jobs cancelled if not started), and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.common import EPILOG, Commands, check_redis, common, need_url, settings_from, sigterm_is_interrupt

if TYPE_CHECKING:
    from broker.settings import Settings
    from gateway.batchsettings import BatchSettings
    from gateway.catalog import Tiers
    from gateway.keys import KeyRing
    from gateway.settings import GatewaySettings
    from policies.config import PolicyConfig

log = logging.getLogger("inference_broker.gateway")


@click.group(cls=Commands, invoke_without_command=True, epilog=EPILOG)
@common
@click.option("--host", envvar="IB_GATEWAY_HOST", metavar="ADDR",
              help="Address to listen on [env IB_GATEWAY_HOST; default: 127.0.0.1; 0.0.0.0 in a container].")
@click.option("--port", type=click.IntRange(0, 65535), envvar="IB_GATEWAY_PORT", metavar="PORT",
              help="TCP port; 0 picks a free one [env IB_GATEWAY_PORT; default: 8000].")
@click.option("--keys-file", type=click.Path(dir_okay=False, path_type=Path), envvar="IB_GATEWAY_KEYS_FILE",
              help="API keys: lines '<sha256 hex> <tenant>' from `gateway hash-key` [env IB_GATEWAY_KEYS_FILE; "
                   "or the lines themselves in IB_GATEWAY_KEYS].")
@click.option("--no-auth", is_flag=True, default=None, envvar="IB_GATEWAY_NO_AUTH",
              help="Serve without API keys, every request as tenant 'default'. Without keys and without "
                   "this flag the gateway refuses to start.")
@click.option("--grace", type=click.FloatRange(min=0), envvar="IB_GATEWAY_GRACE_S", metavar="SECONDS",
              help="Seconds in-flight requests get to finish on SIGTERM [env IB_GATEWAY_GRACE_S; default: 30].")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), envvar="IB_GATEWAY_REQUEST_TIMEOUT_S",
              metavar="SECONDS", help="Longest wait for a job when the client sets no timeout "
                                      "[env IB_GATEWAY_REQUEST_TIMEOUT_S; default: 600].")
@click.option("--tiers", envvar="IB_GATEWAY_TIERS", metavar="TIER=CLASS",
              help="service_tier mapping over the default (priority: the most urgent class, flex: batch, "
                   "default: the policy's rules), comma-separated, e.g. 'flex=standard' [env IB_GATEWAY_TIERS].")
@click.pass_context
def gateway(ctx: click.Context, /, host: str | None, port: int | None, keys_file: Path | None, no_auth: bool | None,
            grace: float | None, request_timeout: float | None, tiers: str | None, **opts: Any) -> None:
    """Serve the OpenAI API (chat, completions, embeddings, models) onto the queue.

    Each request becomes a job on its shard (tenant from its API key, in the tenant's own
    space if the policy config lists it under [tenants]; SLO class from service_tier or the
    X-IB-SLO header, deadline from X-IB-Deadline-Ms or the client's timeout); its result, or
    its token stream with "stream": true, becomes the response.
    Also serves the Batch API (/v1/files, /v1/batches; files under IB_GATEWAY_FILES_DIR),
    /metrics, /healthz and /readyz. See docs/gateway.md.
    """
    if ctx.invoked_subcommand is not None:
        return
    from broker.config import load_config
    from gateway.batchsettings import BatchSettings
    from gateway.settings import GatewaySettings

    settings = need_url(settings_from(**opts))
    try:
        gw = GatewaySettings.from_env(host=host, port=port, keys_file=keys_file, no_auth=no_auth, grace_s=grace,
                                      request_timeout_s=request_timeout, tiers=tiers)
        keys = gw.keyring()
        config = load_config(settings.config)
        tier_map = gw.tier_map(config)
        batches = BatchSettings.from_env()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    assert settings.redis_url is not None
    check_redis(settings.redis_url)
    if keys is None:
        log.warning("serving without API keys (--no-auth): every request is tenant 'default'")
    elif config.tenants:
        log.info("tenants with spaces of their own: %s; other keys' requests run in the default space",
                 ", ".join(sorted(config.tenants)))
    sigterm_is_interrupt()
    try:
        _run(settings, gw, keys, config, tier_map, batches)
    except KeyboardInterrupt:
        pass  # SIGTERM or Ctrl-C after the drain: a clean stop


def _run(settings: Settings, gw: GatewaySettings, keys: KeyRing | None, config: PolicyConfig, tiers: Tiers,
         batches: BatchSettings) -> None:
    import uvicorn

    from broker.client import Client
    from cli.httpd import Readiness
    from gateway.app import create_app
    from gateway.batches import BatchApi
    from gateway.context import Gateway

    url = settings.redis_url or ""

    async def main() -> None:
        client = Client(url, prefix=settings.prefix, shards=settings.shards,
                        replicas=settings.submit_replicas, replicas_ms=settings.submit_replicas_ms,
                        block_ms=settings.block_ms, max_backlog=settings.max_backlog,
                        max_job_bytes=settings.max_job_bytes, result_ttl_s=settings.result_ttl_s)
        service = Gateway(client, config=config, tiers=tiers, options=gw.options())
        app = create_app(service, keys=keys, probe=Readiness(url, [], role="gateway"),
                         extensions=[BatchApi(service, batches)])
        server = uvicorn.Server(uvicorn.Config(
            app, host=gw.host, port=gw.port, http="httptools", lifespan="on", log_config=None, access_log=False,
            server_header=False, timeout_graceful_shutdown=math.ceil(gw.grace_s)))
        await server.serve()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main())
    else:
        uvloop.run(main())


@gateway.command("hash-key", epilog=EPILOG)
@click.option("--tenant", required=True, help="Tenant the key's requests run as (their jobs' tenant).")
def hash_key(tenant: str) -> None:
    """Read an API key on stdin and print its keys-file line: its SHA-256 and the tenant.

    The key is read from stdin, never from the command line (which shows in `ps`):

    \b
      openssl rand -hex 24 | tee acme.key |
        inference-broker gateway hash-key --tenant acme >> keys.txt
    """
    from gateway.keys import key_line

    key = sys.stdin.readline().strip() if not sys.stdin.isatty() else click.prompt("API key", hide_input=True)
    try:
        click.echo(key_line(key, tenant))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
