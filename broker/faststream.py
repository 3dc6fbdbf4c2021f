"""FastStream as a first-class producer and result consumer, on its public API.

::

    broker = broker_for(url)                # RedisBroker, or RedisClusterBroker for redis+cluster://
    app = FastStream(broker)
    topo = Topology("ib", shards=3)         # the deployment's prefix and shards
    results = ResultSubscriber(app, broker, topo, group="billing", consumer="billing-1")

    @results
    async def on_result(result: Result) -> None:
        ...                                 # a typed Result; acked once this returns

    jobs = JobPublisher(broker, topo)
    ...
    await jobs.publish(Job.chat("llama-3.1-8b", "Hi"))

What FastStream leaves to its users on Redis streams is done here (docs/faststream.md):

* **Typed bodies.** A result entry is a plain ``result`` field, not a FastStream envelope:
  a decoder reads it from the raw entry into a :class:`~broker.wire.Result`. An entry that
  is not a result is logged and acked (it would fail on every delivery).
* **A group at 0, made before the subscribers start** (on app start-up): FastStream's own
  would be made at ``$`` and skip the results written before the service first ran.
* **Acked after the handler returns** (``REJECT_ON_ERROR``): a handler that raises leaves
  its result pending, and it is delivered again (below).
* **Pending entries after a restart.** FastStream reads only new entries (``>``). So each
  stream also gets a claim-only subscriber (``min_idle_time``: ``XAUTOCLAIM``), which
  takes entries idle for ``claim_idle_ms`` (a consumer that died, a handler that raised),
  and at start-up this consumer's own pending entries (what a SIGTERM left prefetched, or
  a SIGKILL left running) are marked idle that long (``XCLAIM ... IDLE JUSTID``): the claim
  subscriber takes them at once, and each is handled once. ``claim_idle_ms`` must exceed the time one read of
  ``max_records`` results takes to handle, or a slow read's tail is taken over and handled twice.
* **Every shard.** One pair of subscribers per shard's reply stream; each read names one
  stream (one cluster slot), so ``RedisClusterBroker`` serves a cluster deployment.

At least once: a result handled when its process is killed (SIGKILL) before the ack is
handled again after the restart; make the handler idempotent by ``result.id`` if that matters.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from faststream import AckPolicy, FastStream
from faststream.message import StreamMessage
from faststream.redis import RedisBroker, RedisClusterBroker, StreamSub

from broker.connection import CLUSTER_SCHEMES
from broker.streams import ensure_group
from broker.topology import Topology
from broker.wire import DECODE_ERRORS, Job, Result, decode_result, encode_job

log = logging.getLogger("inference_broker.faststream")
Handler = TypeVar("Handler", bound=Callable[[Result], Awaitable[None]])
AnyBroker = RedisBroker | RedisClusterBroker
PENDING_PAGE = 1000
"""Own pending entries marked idle per round trip at start-up."""


def broker_for(url: str, **options: Any) -> AnyBroker:
    """A FastStream broker for the deployment at ``url``: a ``RedisClusterBroker`` for
    ``redis+cluster://`` and ``rediss+cluster://`` (the URLs the roles take), else a ``RedisBroker``.
    ``options`` go to the broker (``logger=None`` to silence its per-message log lines)."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in CLUSTER_SCHEMES:
        return RedisClusterBroker(f"{CLUSTER_SCHEMES[scheme]}://{rest}", **options)
    return RedisBroker(url, **options)


def _decode(msg: StreamMessage[Any]) -> Result | None:
    """The :class:`Result` of a result-stream entry, or None for an entry that holds none."""
    raw = msg.raw_message.get("data", {}).get(b"result")
    try:
        return None if raw is None else decode_result(raw)
    except DECODE_ERRORS as exc:
        log.warning("skipping an entry of %s: not a result (%s)", msg.raw_message.get("channel"), exc)
        return None


class ResultSubscriber:
    """Typed results of reply stream ``reply_to`` on every shard of ``topo``, through consumer
    ``consumer`` of group ``group``. Decorate one handler ``async def (result: Result)`` with it.

    ``consumer`` must stay the same across restarts (it finds its own pending entries by it)
    and differ between processes sharing the group.
    """

    def __init__(self, app: FastStream, broker: AnyBroker, topo: Topology, *, group: str, consumer: str,
                 reply_to: str = "results", max_records: int = 16, claim_idle_ms: int = 60_000,
                 polling_ms: int = 100) -> None:
        self.broker = broker
        self.streams = [shard.reply(reply_to) for shard in topo.every_shard]  # ValueError for a reserved name
        self.group = group
        self.consumer = consumer
        self.max_records = max_records
        self.claim_idle_ms = claim_idle_ms
        self.polling_ms = polling_ms
        app.on_startup(self.prepare)

    def __call__(self, handler: Handler) -> Handler:
        async def handle(body: Any) -> None:  # noqa: ANN401 - the decoder's Result (or None), passed as is
            if body is not None:
                await handler(body)

        for stream in self.streams:
            for claim in (None, self.claim_idle_ms):
                sub = StreamSub(stream, group=self.group, consumer=self.consumer, max_records=self.max_records,
                                polling_interval=self.polling_ms, min_idle_time=claim)
                self.broker.subscriber(stream=sub, decoder=_decode, ack_policy=AckPolicy.REJECT_ON_ERROR,
                                       title=f"{stream}:{'claim' if claim else 'new'}")(handle)
        return handler

    async def prepare(self) -> None:
        """Make each stream's group at 0 if new, and mark our own pending entries idle, so the
        claim subscribers take them at once. Runs at app start-up, before the subscribers start."""
        client = await self.broker.connect()
        for stream in self.streams:
            await ensure_group(client, stream, self.group)
            start = "-"
            while True:
                page = await client.xpending_range(stream, self.group, start, "+", PENDING_PAGE, self.consumer)
                ids = [p["message_id"] for p in page]
                if ids:
                    await client.xclaim(stream, self.group, self.consumer, 0, ids, idle=self.claim_idle_ms,
                                        justid=True)
                if len(ids) < PENDING_PAGE:
                    break
                start = "(" + ids[-1].decode()


class JobPublisher:
    """Publishes jobs through FastStream publishers, one per shard's ingress: each job onto
    the ingress of its id's shard (:meth:`~broker.topology.Topology.of_job`), as JSON in
    FastStream's envelope, which the ingress unwraps. Made before the broker starts."""

    def __init__(self, broker: AnyBroker, topo: Topology) -> None:
        self.topo = topo
        self.publishers = [broker.publisher(stream=shard.jobs, title=f"{shard.jobs}:publish")
                           for shard in topo.every_shard]

    async def publish(self, job: Job) -> str:
        """Publish ``job``; its ingress entry id. Raises :class:`~broker.wire.InvalidJob` for a job
        the broker would dead-letter. Publishing a job again is harmless: an id runs once.
        Unlike :meth:`broker.client.Client.submit`, no ``max_backlog`` is checked."""
        entry = await self.publishers[self.topo.of_job(job.id).shard].publish(encode_job(job))
        return entry.decode() if isinstance(entry, bytes) else str(entry)
