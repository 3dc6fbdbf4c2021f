"""``demo --via gateway``: the demo's workload sent as OpenAI requests through the official client.

Each job becomes the request an OpenAI application would send (chat, completion or
embeddings, ``max_tokens`` kept); the gateway turns it into a job of its own. The table
then reads each job's broker result by the id the gateway answered with (``x-ib-job-id``),
so that it shows the same classes, pools and timings as the SDK's demo. The tenant is the
API key's (``OPENAI_API_KEY``; any key on a gateway without keys), not the workload's.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

import click
from rich.progress import Progress

from broker.client import Client
from broker.wire import Job, Result

INSTALL_HINT = "pip install openai (the official OpenAI Python client; the `test` extra has it)"


def openai_client(base_url: str) -> Any:
    """The official async client for the gateway at ``base_url`` (``.../v1``)."""
    try:
        import openai
    except ImportError:
        raise click.UsageError(f"demo --via gateway needs the openai package: {INSTALL_HINT}") from None
    for name in ("httpx", "httpx2", "openai"):  # a log line per request would bury the progress bars
        logging.getLogger(name).setLevel(logging.WARNING)
    return openai.AsyncOpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "none", max_retries=2)


async def _send(api: Any, job: Job, timeout: float) -> str | None:
    """Send ``job`` as its OpenAI request; the id of the gateway's job (None: refused before it was one)."""
    import openai

    try:
        if job.kind == "embedding":
            raw = await api.embeddings.with_raw_response.create(model=job.model, input=job.texts, timeout=timeout)
        elif job.kind == "completion":
            raw = await api.completions.with_raw_response.create(model=job.model, prompt=job.prompt,
                                                                 max_tokens=job.max_tokens, timeout=timeout)
        else:
            messages = [{"role": m.role, "content": m.content} for m in job.messages or ()]
            raw = await api.chat.completions.with_raw_response.create(model=job.model, messages=messages,
                                                                      max_tokens=job.max_tokens, timeout=timeout)
        return str(raw.headers["x-ib-job-id"])
    except openai.APIStatusError as exc:  # refused or expired: the job (if one was made) has its outcome
        found = exc.response.headers.get("x-ib-job-id")
        return str(found) if found else None


async def drive(api: Any, client: Client, workload: Sequence[tuple[float, Job]], *, timeout: float,
                progress: Progress | None = None) -> list[Result]:
    """Send the workload on its schedule through the gateway; gather each job's broker result."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    done = progress.add_task("answered", total=len(workload)) if progress else None

    async def one(offset: float, job: Job) -> Result | None:
        await asyncio.sleep(max(0.0, start + offset - loop.time()))
        job_id = await _send(api, job, timeout)
        if progress is not None and done is not None:
            progress.advance(done)
        return None if job_id is None else await client.result(job_id, timeout=timeout)

    results = await asyncio.gather(*(one(offset, job) for offset, job in workload))
    return [r for r in results if r is not None]
