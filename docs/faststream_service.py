"""An example FastStream service on inference-broker (docs/faststream.md): it publishes jobs
and handles their typed results, and a restart neither loses nor repeats one.

    REDIS_URL=redis://127.0.0.1:6390/0 JOBS=20 python docs/faststream_service.py

Settings (environment): REDIS_URL (``redis+cluster://`` for a cluster), IB_PREFIX and
IB_SHARDS as the roles have them, CONSUMER (the same across restarts, one per process),
JOBS (how many jobs to publish at start), OUT (where results go, one JSON line each), and
WORK_MS (stands in for a handler's real work). SIGTERM or Ctrl-C stops it gracefully.
"""

from __future__ import annotations

import asyncio
import json
import os

from faststream import FastStream

from broker.faststream import JobPublisher, ResultSubscriber, broker_for
from broker.topology import Topology
from broker.wire import Job, Result

TOPO = Topology(os.environ.get("IB_PREFIX", "ib"), int(os.environ.get("IB_SHARDS", "1")))
CONSUMER = os.environ.get("CONSUMER", "example-1")
OUT = os.environ.get("OUT", "results.jsonl")
WORK_S = float(os.environ.get("WORK_MS", "0")) / 1000

broker = broker_for(os.environ["REDIS_URL"], logger=None)
app = FastStream(broker, logger=None)
jobs = JobPublisher(broker, TOPO)
# Its own result stream (the jobs' reply_to) and group: results written while it is down wait there.
results = ResultSubscriber(app, broker, TOPO, group="example", consumer=CONSUMER, reply_to="example")


@results
async def handle(result: Result) -> None:
    """One result, typed; it is acked when this returns (raise, and it comes back later)."""
    await asyncio.sleep(WORK_S)
    with open(OUT, "a", encoding="utf-8") as out:
        out.write(json.dumps({"id": result.id, "status": result.status, "output": result.output}) + "\n")


@app.after_startup
async def publish() -> None:
    for i in range(int(os.environ.get("JOBS", "0"))):
        # Stable ids: published again after a restart, none runs twice.
        await jobs.publish(Job(id=f"{CONSUMER}-{i}", model="llama-3.1-8b", kind="completion",
                               prompt=f"Hello {i}", max_tokens=8, reply_to="example"))


if __name__ == "__main__":
    asyncio.run(app.run())
