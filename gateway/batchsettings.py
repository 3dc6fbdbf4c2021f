"""The Batch API's settings: plain frozen data with working defaults, from ``IB_GATEWAY_<NAME>`` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from broker.settings import from_env
from broker.topology import RESERVED
from broker.wire import StreamName
from gateway.settings import gateway_var


def default_files_dir() -> Path:
    """``$XDG_DATA_HOME/inference-broker/files``, else ``~/.local/share/inference-broker/files``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "inference-broker" / "files"


class BatchSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The Batch API's settings; each ``name`` is set by ``IB_GATEWAY_<NAME>`` (docs/configuration.md)."""

    files_dir: Path | None = None
    """Where uploaded and result files live [IB_GATEWAY_FILES_DIR]; ``None``: :func:`default_files_dir`.
    Batches in progress keep their outcomes so far under ``<files_dir>/.spool``: keep the
    directory across gateway restarts (a volume in a container)."""
    max_file_bytes: int = 200 << 20
    """Largest upload [IB_GATEWAY_MAX_FILE_BYTES] (OpenAI's limit for batch files: 200 MB)."""
    max_tenant_bytes: int = 2 << 30
    """Most bytes of uploads and result files one tenant keeps; past it, uploads are refused
    until files are deleted [IB_GATEWAY_MAX_TENANT_BYTES]."""
    batch_max_lines: int = 50_000
    """Most requests in one batch [IB_GATEWAY_BATCH_MAX_LINES] (OpenAI's limit)."""
    batch_max_active: int = 100
    """Most batches of one tenant not yet final; creating another is refused with 429
    [IB_GATEWAY_BATCH_MAX_ACTIVE]. Bounds the gateway's work and the records in Redis."""
    batch_in_flight: int = 512
    """Most jobs of one batch waiting or running at once [IB_GATEWAY_BATCH_IN_FLIGHT]: the rest wait
    in the gateway, so the batch neither floods the ingress nor makes the policy shed it."""
    batch_retries: int = 20
    """How often a request whose job the policy refused (admission: no pool would start it in
    time then) is submitted again, after the refusal's retry hint, before its line goes to the
    error file as a 429 [IB_GATEWAY_BATCH_RETRIES]."""
    batch_chunk: int = 250
    """Jobs submitted per round trip."""
    batch_poll_s: float = 0.5
    """How often a running batch saves its progress and looks for a cancel from elsewhere."""
    batch_drain_s: float = 300.0
    """After a cancel or the expiry, how long a batch waits for jobs that had already started;
    one still unfinished is then written to the error file, and the batch is final."""
    batch_lease_s: float = 10.0
    """One gateway of a deployment runs its batches, while it holds a lease in Redis that it
    renews every third of this; when it stops or dies, another takes over within this
    [IB_GATEWAY_BATCH_LEASE_S]."""
    batch_retention_s: int = 30 * 86_400
    """How long a batch's record stays in Redis after its last change [IB_GATEWAY_BATCH_RETENTION_S]."""
    batch_reply_to: StreamName = "batches"
    """Result stream of batch jobs, read by the gateways' consumer group ``gateway-batches``."""

    def __post_init__(self) -> None:
        counts = {"max_file_bytes": self.max_file_bytes, "max_tenant_bytes": self.max_tenant_bytes,
                  "batch_max_lines": self.batch_max_lines, "batch_max_active": self.batch_max_active,
                  "batch_in_flight": self.batch_in_flight,
                  "batch_chunk": self.batch_chunk}
        bad = [name for name, value in counts.items() if value < 1]
        times_ok = (self.batch_poll_s > 0 and self.batch_drain_s >= 0 and self.batch_retention_s >= 1
                    and self.batch_lease_s >= 0.1)
        if bad or self.batch_retries < 0 or not times_ok:
            raise ValueError(f"gateway batch settings: {', '.join(bad) or 'the times and retries'} must be positive")
        if self.batch_reply_to in RESERVED:
            raise ValueError(f"gateway batch_reply_to {self.batch_reply_to!r} is a reserved stream name")

    @property
    def root(self) -> Path:
        return self.files_dir if self.files_dir is not None else default_files_dir()

    @property
    def spool_dir(self) -> Path:
        return self.root / ".spool"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> BatchSettings:
        """Settings from ``IB_GATEWAY_<NAME>`` variables, then ``overrides``; ``ValueError`` names a bad one."""
        return from_env(cls, gateway_var, env, overrides, "gateway setting")
