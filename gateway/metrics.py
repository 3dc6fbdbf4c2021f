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
