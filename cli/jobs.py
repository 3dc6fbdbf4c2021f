"""Commands that submit jobs and read results: ``submit``, ``result``, ``results``."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncGenerator
from typing import Any

import click
import msgspec
import redis.asyncio as aioredis

from broker.wire import ChatMessage, Job, Result, decode_result, new_id
from cli.common import EPILOG, common, need_url, settings_from, tenant_option


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
        # Admission's hints are whole seconds; a tenant's quota may say a fraction of one.
        click.echo(f"  retry   after {result.retry_after_s:.3g} s")
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


@click.command(epilog=EPILOG)
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
@tenant_option
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

    settings = need_url(settings_from(**opts))
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
        fields: dict[str, Any] = {"id": new_id(), "model": model, "kind": kind, "max_tokens": max_tokens, "slo": slo}
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
        async with Client(settings.redis_url or "", prefix=settings.prefix, shards=settings.shards,
                          replicas=settings.submit_replicas, replicas_ms=settings.submit_replicas_ms,
                          max_backlog=settings.max_backlog, max_job_bytes=settings.max_job_bytes,
                          tenant=tenant) as client:
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


@click.command(epilog=EPILOG)
@common
@click.argument("job_id")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0, show_default=True, metavar="SECONDS",
              help="Wait up to SECONDS for a job that has not finished yet (0: look once).")
@click.option("--reply-to", default="results", show_default=True,
              help="Result stream the job replies on (what --wait listens to).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@tenant_option
def result(job_id: str, wait_s: float, reply_to: str, as_json: bool, tenant: str, **opts: Any) -> None:
    """Print the result of one job, stored for an hour by default (IB_RESULT_TTL_S).

    With --wait, waits for a job still running, e.g. one sent with `submit --no-wait`.
    """
    from broker.client import Client
    from broker.errors import ResultTimeout

    settings = need_url(settings_from(**opts))
    try:
        settings.topology.reply(reply_to)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--reply-to") from None

    async def fetch() -> Result | None:
        async with Client(settings.redis_url or "", prefix=settings.prefix, shards=settings.shards,
                          tenant=tenant) as client:
            if wait_s > 0:
                try:
                    return await client.result(job_id, timeout=wait_s, reply_to=reply_to)
                except ResultTimeout:
                    return None
            raw = await client.redis.get(client.topo.of_job(job_id).done(job_id))
            return None if raw is None else decode_result(raw)

    found = asyncio.run(fetch())
    if found is None:
        waited = f"within {wait_s:g} s" if wait_s > 0 else "yet"
        raise click.ClickException(
            f"no result for job {job_id} {waited} (still running, unknown, or expired); "
            "try: --wait SECONDS for a running job, or check the id")
    _print_result(found, as_json)


@click.command(epilog=EPILOG)
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
@tenant_option
def results(reply_to: str, follow: bool, group: str | None, consumer: str, limit: int | None,
            as_json: bool, export: Any, tenant: str, **opts: Any) -> None:
    """Print results from a result stream; --follow tails it, --export saves them.

    With several shards (--shards), reads the stream of every shard: in time order, or
    with --follow as results come.
    """
    from broker.connection import connect
    from broker.merge import merge, merge_in_order

    settings = need_url(settings_from(**opts))
    try:
        streams = [topo.reply(reply_to) for topo in settings.topology.of_tenant(tenant).every_shard]
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
        # Read no more than we will print: a group's entries are acked as they are printed
        # (one read of each shard may go unprinted: it stays pending, and comes first next time).
        page = 100 if limit is None else min(100, limit)
        sources = [_entries(client, stream, group, consumer, page, settings.block_ms if follow else None)
                   for stream in streams]
        entries = merge(sources) if follow else merge_in_order(sources, key=_entry_order)
        count = 0
        try:
            async for stream, entry_id, fields in entries:
                if b"result" in fields:
                    if export is not None:
                        export.write(msgspec.json.encode(decode_result(fields[b"result"])) + b"\n")
                        export.flush()
                        exported += 1
                    else:
                        click.echo(line(decode_result(fields[b"result"])))
                    count += 1
                if group:
                    await client.xack(stream, group, entry_id)
                if limit is not None and count >= limit:
                    break
        finally:
            await entries.aclose()
            await client.aclose()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
    if export is not None:
        export.close()
        click.echo(f"exported {exported} result(s) to {export.name}", err=True)


Entry = tuple[str, bytes, dict[bytes, bytes]]
"""A result-stream entry: the stream (one shard's), its entry id and its fields."""


def _entry_order(entry: Entry) -> tuple[int, int]:
    ms, seq = entry[1].split(b"-")
    return int(ms), int(seq)


async def _entries(client: aioredis.Redis, stream: str, group: str | None, consumer: str, page: int,
                   block_ms: int | None) -> AsyncGenerator[Entry, None]:
    """The entries of one shard's result ``stream``, oldest first, ``page`` per read.

    Without ``group``: every entry. With it: this consumer's pending entries (read before but
    not acked), then those the group has not delivered yet. With ``block_ms``, then waits for
    new ones for good; else stops at the end.
    """
    from broker.streams import ensure_group

    last = "0-0"
    if group:
        await ensure_group(client, stream, group)
    while True:
        waiting = last == ">" or not group
        block = block_ms if waiting else None
        if group:
            reply = await client.xreadgroup(group, consumer, {stream: last}, count=page, block=block)
        else:
            reply = await client.xread({stream: last}, count=page, block=block)
        entries = reply[0][1] if reply else []
        if group and last != ">" and len(entries) < page:
            last = ">"  # the pending ones are done: on to undelivered entries
        elif entries and last != ">":
            last = entries[-1][0].decode()
        elif not entries and waiting and block is None:
            return
        for entry_id, fields in entries:
            yield stream, entry_id, fields or {}  # a pending entry trimmed away since has no fields
