"""What every command shares: its options, its settings, and the group that turns errors into one line."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
import msgspec
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.connection import redacted, unreachable
from broker.errors import BrokerError
from broker.settings import Settings
from broker.topology import MAX_SHARDS, check_tenant
from cli.stack import Gateway, read_state
from policies.config import ConfigError, pool_counts

F = TypeVar("F", bound=Callable[..., Any])
EPILOG = "Docs: README.md and docs/ in the project repository."


URL_KEY = "inference_broker.redis_url"
"""``ctx.meta`` key of the Redis URL a command uses, for its error messages."""
SHARDS_GIVEN_KEY = "inference_broker.shards_given"
"""``ctx.meta`` key: whether --shards or IB_SHARDS set the shard count (else ``up``'s record may)."""


def common(f: F) -> F:
    """Options every command shares: where Redis is, the key prefix, the policy file."""
    f = click.option("--log-format", type=click.Choice(["text", "json"]), envvar="IB_LOG_FORMAT",
                     help="Log lines as text, or one JSON object per line (ts, level, logger, msg, job_id, "
                          "trace_id) [env IB_LOG_FORMAT; default: text].")(f)
    f = click.option("--log-level", default="INFO", show_default=True,
                     type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
                     help="Log verbosity.")(f)
    f = click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar="IB_CONFIG",
                     help="Policy TOML (SLO classes, rules, pools) [env IB_CONFIG; default: built-in]. "
                          "Every command checks it; the roles route by it.")(f)
    f = click.option("--prefix", default="ib", show_default=True, envvar="IB_PREFIX",
                     help="Key prefix of the deployment [env IB_PREFIX].")(f)
    f = click.option("--shards", type=click.IntRange(1, MAX_SHARDS), metavar="S",
                     help="Shards of the deployment; every producer and role must agree "
                          "[env IB_SHARDS; default: 1].")(f)
    f = click.option("--redis-url", envvar="REDIS_URL", metavar="URL",
                     help="Redis to use, e.g. redis://localhost:6379/0 or rediss:// for TLS [env REDIS_URL]. "
                          "@FILE reads the URL from FILE: a password on the command line shows in `ps`.")(f)
    return f


def _has_password(url: str) -> bool:
    parts = urlsplit(url)
    return parts.password is not None or "password=" in parts.query


def _resolve_url(url: str | None) -> str | None:
    """The Redis URL of ``--redis-url``/``REDIS_URL``, read from FILE for ``@FILE``."""
    if url is None or not url.startswith("@"):
        return url
    path = Path(url[1:]).expanduser()
    try:
        url = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read the URL file {path}: {getattr(exc, 'strerror', None) or exc}",
                                 param_hint="--redis-url") from None
    if not url:
        raise click.BadParameter(f"the URL file {path} is empty", param_hint="--redis-url")
    return url


def _warn_if_password_typed(url: str | None) -> None:
    """A password typed in ``--redis-url`` shows in ``ps`` to every user of the machine: say so."""
    ctx = click.get_current_context(silent=True)
    if (url and _has_password(url) and ctx is not None
            and ctx.get_parameter_source("redis_url") == click.core.ParameterSource.COMMANDLINE):
        logging.getLogger("inference_broker").warning(
            "the password in --redis-url shows in `ps` to every user of this machine; "
            "try: REDIS_URL in the environment, or --redis-url @FILE")


def remember_url(url: str | None) -> None:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and url:
        ctx.meta[URL_KEY] = url


def settings_from(redis_url: str | None, prefix: str, config: Path | None, log_level: str,
                  log_format: str | None = None, shards: int | None = None, **extra: Any) -> Settings:
    from broker import logs
    from broker.config import load_config

    typed_url, redis_url = redis_url, _resolve_url(redis_url)
    try:
        settings = Settings.from_env(None, redis_url=redis_url, prefix=prefix, config=config,
                                     log_format=log_format, shards=shards, **extra)
    except ValueError as exc:
        logs.setup(log_level)
        raise click.UsageError(logs.scrub(str(exc))) from None
    logs.setup(log_level, settings.log_format)
    _warn_if_password_typed(typed_url)
    if settings.config is not None:
        try:
            load_config(settings.config)  # a bad file fails every command, not only the roles that route by it
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--config") from None
    remember_url(settings.redis_url)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[SHARDS_GIVEN_KEY] = shards is not None or bool(os.environ.get("IB_SHARDS"))
    return settings


def metrics_port_option(help: str) -> Callable[[F], F]:
    """``--metrics-port``: where a role serves /metrics, /healthz and /readyz."""
    return click.option("--metrics-port", type=click.IntRange(0, 65535), envvar="IB_METRICS_PORT", metavar="PORT",
                        help=help)


def cluster_options(f: F) -> F:
    """``--cluster N`` and ``--replicas R``: a local Redis Cluster for ``up`` and ``demo``."""
    f = click.option("--replicas", type=click.IntRange(min=0), metavar="R",
                     help="With --cluster: replicas per primary, which take over when it fails "
                          "[default: 0].")(f)
    f = click.option("--cluster", "cluster_primaries", type=click.IntRange(min=1), metavar="N",
                     help="Start a local Redis Cluster of N primaries (redis-server processes on "
                          "loopback) instead of the embedded Redis; one shard per primary unless "
                          "--shards says otherwise.")(f)
    return f


def gateway_options(f: F) -> F:
    """``--gateway-port`` and ``--no-gateway``: the OpenAI-compatible gateway of ``up`` and ``demo``."""
    f = click.option("--no-gateway", is_flag=True, help="Start no gateway.")(f)
    f = click.option("--gateway-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
                     envvar="IB_GATEWAY_PORT", metavar="PORT",
                     help="Port of the OpenAI-compatible gateway on 127.0.0.1; 0 picks a free one "
                          "[env IB_GATEWAY_PORT].")(f)
    return f


def local_gateway(port: int) -> Gateway:
    """The local stack's gateway on ``port`` (0: a free one), keyed when the environment has API keys."""
    import socket

    from cli.embedded import free_port

    if port == 0:
        port = free_port()
    else:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                raise click.UsageError(f"port {port} is in use; pass --gateway-port N (0: any free port) or "
                                       "--no-gateway") from None
    return Gateway(port, keyed=bool(os.environ.get("IB_GATEWAY_KEYS_FILE") or os.environ.get("IB_GATEWAY_KEYS")))


def local_cluster(settings: Settings, primaries: int | None,
                  replicas: int | None) -> tuple[Settings, tuple[int, int] | None]:
    """The settings and the (primaries, replicas) of ``--cluster``/``--replicas``, checked.

    None when no cluster was asked for. Shards default to one per primary.
    """
    if primaries is None:
        if replicas is not None:
            raise click.UsageError("--replicas needs --cluster N: replicas belong to a local cluster's primaries")
        return settings, None
    if settings.redis_url:
        raise click.UsageError("--cluster starts its own Redis: leave out --redis-url and REDIS_URL")
    ctx = click.get_current_context(silent=True)
    if not (ctx is not None and ctx.meta.get(SHARDS_GIVEN_KEY)):
        settings = msgspec.structs.replace(settings, shards=primaries)
    return settings, (primaries, replicas or 0)


def need_url(settings: Settings) -> Settings:
    """Commands that talk to a running stack: the given URL, else the one ``up`` recorded.

    With ``up``'s URL comes its shard count (``up --cluster N`` runs N shards), unless
    --shards or IB_SHARDS says otherwise.
    """
    if settings.redis_url:
        return settings
    try:
        url, shards = read_state()
    except OSError:
        url, shards = "", None
    if not url:
        raise click.UsageError(
            "no Redis configured. Pass --redis-url or set REDIS_URL, or start a local stack "
            "with `inference-broker up` in another terminal (it is found automatically).")
    remember_url(url)
    ctx = click.get_current_context(silent=True)
    if shards is None or (ctx is not None and ctx.meta.get(SHARDS_GIVEN_KEY)):
        shards = settings.shards
    return msgspec.structs.replace(settings, redis_url=url, shards=shards)


def user_error(exc: Exception, url: str | None) -> str | None:
    """One line saying what went wrong and what to try, for an error the user can act on.

    None for anything else: a bug keeps its traceback.
    """
    where = f"Redis at {redacted(url)}" if url else "Redis"
    if isinstance(exc, AuthenticationError):
        return f"{where} refused the credentials ({exc}); try: check the user and password in the URL"
    if isinstance(exc, BrokerError | ConfigError):
        return str(exc)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return unreachable(url, exc) if url else str(exc)
    if isinstance(exc, NoPermissionError):
        return (f"{where} refused: this user may not do that ({exc}); try: the credentials of the role or tenant "
                "it is for (`inference-broker acl`), and --tenant for a tenant's jobs (docs/security.md)")
    if isinstance(exc, RedisError):
        return f"{where} refused a command ({exc}); try: check its settings and its log"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}; try: check the path and its permissions"
    return None


class Commands(click.Group):
    """The command group: whole sentences in the list of commands, and one-line errors.

    Every command runs under :meth:`invoke`, so an error a user can act on (Redis down or
    misconfigured, a bad policy file, a job rejected) prints as one ``error: ...; try: ...``
    line with exit status 1, in one place rather than a try/except per command.
    """

    group_class = type  # subgroups (``dead``) are Commands too

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Click cuts each command's first sentence to fit one line, mid-phrase; wrap it whole.
        rows = [(name, cmd.get_short_help_str(limit=sys.maxsize)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from broker import logs

        try:
            return super().invoke(ctx)
        except (click.UsageError, click.exceptions.Exit, click.Abort):
            raise
        except click.ClickException as exc:
            message, code = exc.format_message(), exc.exit_code
        except Exception as exc:  # noqa: BLE001 - sorted into a one-line error or re-raised
            found = user_error(exc, ctx.meta.get(URL_KEY))
            if found is None:
                raise
            message, code = found, 1
        click.secho(f"error: {logs.scrub(message)}", fg="red", err=True)
        ctx.exit(code)


def _tenant(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    try:
        return check_tenant(value) if value else ""
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def tenant_option(f: F) -> F:
    """``--tenant``: act in a tenant's key space (docs/security.md), passed as ``tenant``."""
    return click.option(
        "--tenant", envvar="IB_TENANT", metavar="NAME", callback=_tenant,
        help="Act as tenant NAME: its own ingress and results. REDIS_URL must carry its credentials "
             "(`inference-broker acl`). Default: the deployment's default space.")(f)


def workers_option(f: F) -> F:
    return click.option(
        "--workers", "worker_counts", metavar="POOL=N", multiple=True,
        help="Worker processes for a pool; repeat per pool. Default: 2 for the default pool, 1 for others.")(f)


def pool_workers(settings: Settings, counts: tuple[str, ...]) -> dict[str, int]:
    """Worker processes per configured pool, from ``--workers POOL=N`` over the defaults."""
    from broker.config import load_config

    config = load_config(settings.config)
    base = {pool: 2 if pool == config.default_pool else 1 for pool in config.pools}
    try:
        return pool_counts(config, counts, base)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--workers") from None


def check_redis(url: str) -> None:
    """Ping Redis at ``url`` before starting roles that need it: a URL that cannot work fails here, saying why."""
    from broker.connection import connect

    async def ping() -> None:
        client = connect(url)
        try:
            await client.ping()  # type: ignore[misc]
        finally:
            await client.aclose()

    asyncio.run(ping())


def sigterm_is_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C, so `kill` stops the stack as cleanly as Ctrl-C does.

    SIGINT is set explicitly too: a process started in the background by a shell (`&`,
    `nohup`) inherits SIGINT ignored, and would otherwise never stop on Ctrl-C or `kill -INT`.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
