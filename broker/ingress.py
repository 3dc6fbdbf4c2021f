"""An ingress entry's job bytes (the ``job`` field, or the body of FastStream's ``__data__``
envelope), and what can be salvaged from a job that fails validation to answer its producer.

FastStream 0.7.8 publishes a stream entry with one field ``__data__`` holding its binary
envelope (magic, version, a header table, the body). The envelope is read here from its
documented layout rather than through FastStream's parser modules, which are not public API
and which hand back their input when an envelope does not parse (the job decoder would then
report the envelope's bytes as a bad job).
"""

from __future__ import annotations

import struct
from typing import cast

import msgspec

from broker.topology import RESERVED
from broker.wire import DECODE_ERRORS, InvalidJob, JobId, Kind, StreamName
from policies.config import JOB_KINDS

_FASTSTREAM_MAGIC = b"\x89BIN\r\n\x1a\n"
_FASTSTREAM_HEAD = struct.Struct(">HII")
"""What follows the magic: the envelope's version, where its header table starts, where the body starts."""
_U16 = struct.Struct(">H")


def entry_payload(fields: dict[bytes, bytes]) -> bytes:
    """The job bytes of an ingress entry: field ``job``, or a FastStream ``__data__`` envelope."""
    if b"job" in fields:
        return fields[b"job"]
    if b"__data__" in fields:
        data = fields[b"__data__"]
        return faststream_body(data) if data.startswith(_FASTSTREAM_MAGIC) else data
    names = ", ".join(sorted(repr(f.decode(errors="replace")) for f in fields)) or "none"
    raise InvalidJob("decode_error", f"entry has no `job` field (fields: {names})")


def faststream_body(data: bytes) -> bytes:
    """The job in FastStream's binary envelope (version 1), whose headers are skipped.

    The envelope is checked here, not by FastStream's parser: that one hands back its input
    when the envelope does not parse, and the job decoder would then report the envelope's
    bytes as a bad job.
    """
    head = len(_FASTSTREAM_MAGIC) + _FASTSTREAM_HEAD.size
    if len(data) < head + _U16.size:
        raise _bad_envelope(f"{len(data)} bytes, too short for its header")
    version, table, body = _FASTSTREAM_HEAD.unpack_from(data, len(_FASTSTREAM_MAGIC))
    if version != 1:
        raise _bad_envelope(f"version {version}")
    end = table + _U16.size
    if not head <= table or end > len(data):
        raise _bad_envelope(f"its header table starts at byte {table} of {len(data)}")
    for _ in range(2 * _U16.unpack_from(data, table)[0]):  # a name and a value per header
        if end + _U16.size > len(data):
            raise _bad_envelope(f"its header table runs past the end ({len(data)} bytes)")
        end += _U16.size + _U16.unpack_from(data, end)[0]
    if not end <= body <= len(data):
        raise _bad_envelope(f"its body starts at byte {body}, its header table ends at {end}, of {len(data)}")
    return data[body:]


def _bad_envelope(what: str) -> InvalidJob:
    return InvalidJob("decode_error", f"bad FastStream envelope: {what}; expected FastStream's binary "
                                      "envelope (version 1) around a JSON object or a msgpack map")


class Salvaged(msgspec.Struct):
    """The parts of a rejected job needed to answer its producer."""

    id: JobId
    reply_to: StreamName = "results"
    model: str = ""
    given_kind: str = msgspec.field(default="chat", name="kind")
    tenant: str = "default"

    @property
    def kind(self) -> Kind:
        """The job's kind if it is one, else ``chat``: the result must still be a valid one."""
        return cast("Kind", self.given_kind) if self.given_kind in JOB_KINDS else "chat"


_SALVAGE_JSON = msgspec.json.Decoder(Salvaged)
_SALVAGE_MSGPACK = msgspec.msgpack.Decoder(Salvaged)


def salvage(raw: bytes) -> Salvaged | None:
    """Id and reply stream of a job that failed validation, if they are themselves valid.

    A producer waiting on such a job then gets a ``failed`` result at once instead of a
    timeout; entries without a usable id only become dead letters.
    """
    try:
        got = (_SALVAGE_JSON if raw.lstrip()[:1] == b"{" else _SALVAGE_MSGPACK).decode(raw)
    except DECODE_ERRORS:
        return None
    return None if got.reply_to in RESERVED else got
