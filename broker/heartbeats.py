"""Reading heartbeat hashes: each role's beat typed, a beat that does not decode skipped.

A heartbeat hash is written by every role of a pool (or every policy worker), and anything
with access to Redis can write a field there: an older or newer version, a script, a typo.
One field that is not a beat must not stop the policy's snapshot, the janitor or ``top``,
nor hide the other roles' beats: it is skipped, as if that role sent nothing, and logged
once per field (the policy reads the hash every snapshot period).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

from broker.logs import printable
from broker.topology import Topology
from broker.wire import DECODE_ERRORS, Beat, decode_heartbeat, decode_policy_heartbeat

log = logging.getLogger("inference_broker.heartbeats")
B = TypeVar("B", bound=Beat)

_MAX_WARNED = 4096
_warned: set[tuple[str, bytes]] = set()
"""(hash key, field) of the malformed beats already logged; forgotten once the field decodes."""


def read_beats(fields: Mapping[bytes, bytes], decode: Callable[[bytes], B], key: str) -> dict[bytes, B]:
    """The beats of heartbeat hash ``key`` (``fields``: its HGETALL) that ``decode`` accepts, by
    role name. One that does not decode is left out, with a warning the first time."""
    beats: dict[bytes, B] = {}
    for name, raw in fields.items():
        try:
            beats[name] = decode(raw)
        except DECODE_ERRORS as exc:
            _malformed(key, name, exc)
            continue
        if _warned:
            _warned.discard((key, name))
    return beats


def decoder_of(topo: Topology, key: str) -> Callable[[bytes], Beat]:
    """The decoder of heartbeat hash ``key``: the policy workers' beats, or a pool's workers'. Each
    hash holds one type: a beat that the policy would not count is no sign of life to anyone."""
    return decode_policy_heartbeat if key == topo.policy_heartbeats else decode_heartbeat


def fresh(beats: Mapping[bytes, Beat], now: float, max_age: float) -> int:
    """How many of ``beats`` are younger than ``max_age`` seconds at ``now``: roles alive."""
    return sum(now - beat.ts < max_age for beat in beats.values())


def _malformed(key: str, name: bytes, exc: Exception) -> None:
    if (key, name) in _warned:
        return
    if len(_warned) >= _MAX_WARNED:  # a hash full of junk: bound the memory, warn again later
        _warned.clear()
    _warned.add((key, name))
    # The name and the error are untrusted text (the error may quote the field): escaped.
    log.warning("ignoring heartbeat %s in %s: not a heartbeat (%s)", printable(name.decode(errors="replace")),
                key, printable(str(exc)))
