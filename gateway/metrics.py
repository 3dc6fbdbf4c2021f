"""Prometheus metrics of the gateway, served on its own /metrics with the process collectors.

Labels stay bounded: ``endpoint`` (chat, completion, embedding) and ``code`` (HTTP status).
The broker's job metrics are counted by the roles that decide each job's outcome
(:mod:`broker.metrics`); these count what the gateway's clients saw.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from broker.metrics import LATENCY_BUCKETS

_NS = "inference_broker_gateway"

REQUESTS = Counter("requests", "OpenAI requests answered, by endpoint and HTTP status (a stream counts "
                   "when it ends).", ["endpoint", "code"], namespace=_NS)
DURATION = Histogram("request_duration_seconds", "Request received to response (or stream) ended.",
                     ["endpoint"], namespace=_NS, buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("in_flight", "Requests being served now (streams included).", ["endpoint"], namespace=_NS)
CANCELLED = Counter("jobs_cancelled", "Jobs ended as cancelled because their client went away before they "
                    "started.", ["endpoint"], namespace=_NS)

# The Batch API (gateway/batches.py): batches and their requests, as their owners see them.
BATCHES = Counter("batches", "Batches that became final, by status.", ["status"], namespace=_NS)
BATCH_REQUESTS = Counter("batch_requests", "Batch requests with an outcome, by the file it went to (output, "
                         "error).", ["file"], namespace=_NS)
BATCH_RETRIES = Counter("batch_retries", "Batch requests submitted again after the policy refused their job "
                        "(admission: no pool would start it in time then).", namespace=_NS)
BATCHES_RUNNING = Gauge("batches_running", "Batches this gateway runs now.", namespace=_NS)
