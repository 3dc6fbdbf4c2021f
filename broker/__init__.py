"""inference-broker: route inference jobs across GPU and accelerator pools over Redis streams.

The SDK in one import::

    from broker import Client, Job

    async with Client("redis://localhost:6379/0") as client:
        result = await client.run(Job.chat("llama-3.1-8b", "Hello"), timeout=30)

or, without asyncio, ``broker.run_job(job, redis_url=...)``.
"""

from broker.client import Client, cancel_job, run_job, submit_jobs
from broker.errors import BrokerError, JobFailed, JobRejected, RedisUnavailable, ResultTimeout
from broker.wire import ChatMessage, DeadLetter, Job, Metrics, Result, Timing, Usage, new_id

__all__ = [
    "BrokerError",
    "ChatMessage",
    "Client",
    "DeadLetter",
    "Job",
    "JobFailed",
    "JobRejected",
    "Metrics",
    "RedisUnavailable",
    "Result",
    "ResultTimeout",
    "Timing",
    "Usage",
    "cancel_job",
    "new_id",
    "run_job",
    "submit_jobs",
]
