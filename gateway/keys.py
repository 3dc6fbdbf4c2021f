"""API keys: each maps to a tenant; only their SHA-256 digests are kept.

A keys file (``--keys-file``) or ``IB_GATEWAY_KEYS`` holds one ``<sha256 hex> <tenant>`` per
line (``#`` starts a comment; the env variable may also separate entries with ``,``).
``inference-broker gateway hash-key`` prints such a line for a key read on stdin, so that
no key is ever written in a file, an argument list or a log. A presented key is hashed and
compared with every digest in constant time (:func:`hmac.compare_digest`), without an early
exit, so neither a digest nor which tenant matched leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from broker.wire import Tenant

_HEX = re.compile(r"[0-9a-f]{64}")
_TENANT = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
NO_AUTH_TENANT = "default"
"""The tenant of every request when the gateway runs with ``--no-auth``."""


class KeysError(ValueError):
    """A keys file or variable that does not parse; the message names the line, never a key."""


def digest(key: str) -> str:
    """The SHA-256 hex digest of an API key, as the keys file stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_line(key: str, tenant: Tenant) -> str:
    """The keys-file line for ``key`` and ``tenant``."""
    if not key.strip():
        raise KeysError("the key is empty")
    if not _TENANT.fullmatch(tenant):
        raise KeysError(f"tenant {tenant!r}: use 1-64 of A-Z a-z 0-9 _ . : @ -")
    return f"{digest(key.strip())} {tenant}"


class KeyRing:
    """Digests of the accepted API keys, each with its tenant."""

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        self.digests = [(bytes.fromhex(hexed), tenant) for hexed, tenant in entries]

    def __len__(self) -> int:
        return len(self.digests)

    @staticmethod
    def entries(text: str, source: str) -> list[tuple[str, str]]:
        """(digest, tenant) of each line of ``text`` (a keys file's, or the variable's); ``source`` names it."""
        entries = []
        for number, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2 or not _HEX.fullmatch(fields[0].lower()) or not _TENANT.fullmatch(fields[1]):
                # Never echo the line: a raw key pasted by mistake must not reach a log.
                raise KeysError(f"{source}: entry {number} is not '<sha256 hex> <tenant>'; make one with "
                                "`inference-broker gateway hash-key --tenant NAME` (reads the key on stdin)")
            entries.append((fields[0].lower(), fields[1]))
        return entries

    def tenant(self, key: str) -> str | None:
        """The tenant of ``key``, or None when it is not one of ours."""
        presented = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, tenant in self.digests:
            if hmac.compare_digest(presented, stored):
                found = tenant
        return found
