"""The block data protocol between a controller and an agent: frames, without sockets.

gRPC carries the agent's control calls (create, delete, stat, copy, fence); the
data path — read, write, flush, zero — is this small binary protocol over one
long-lived TCP connection per agent, because a unary Python gRPC round trip costs
about 15 times what a framed request over asyncio streams does on this machine
(docs/performance.md). Requests carry an id and complete out of order, so many
are in flight on one connection; payloads follow their header, so nothing is
re-encoded on the way.

    request   magic "VKRQ" · op u8 · flags u8 · extent id length u16 · id u64 ·
              offset u64 · length u32 · epoch u64  (36 bytes), extent id, then
              `length` bytes of data for a WRITE, or of a copy's description
              (`encode_copy`) for a COPY into the extent; a MAP asks where
              [offset, offset + length) holds data
    response  magic "VKRS" · status u8 · 0 u8 · message length u16 · id u64 ·
              length u32  (20 bytes), the message (UTF-8), then `length` bytes of
              data for a READ, or of data ranges (`encode_map`) for a MAP

`status` is 0, or the gRPC status code of the domain error (`volkin.rpc_status`
is the one table that maps both ways), and the message says why. Every mutation
carries the caller's fencing epoch and is fenced exactly like its gRPC twin.
All numbers are big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

REQUEST_MAGIC = b"VKRQ"
RESPONSE_MAGIC = b"VKRS"
_REQUEST = struct.Struct(">4sBBHQQIQ")
_RESPONSE = struct.Struct(">4sBBHQI")
REQUEST_HEADER = _REQUEST.size
RESPONSE_HEADER = _RESPONSE.size
MAX_EXTENT_ID = 128
MAX_MESSAGE = 1024
MAX_DATA = 4 << 20  # as one gRPC Write: larger ranges are several requests

# A payload to send: bytes, a bytearray, or a view of either passed on uncopied.
Data = bytes | bytearray | memoryview
# A payload that arrived: bytes, or the bytearray the socket filled in place
# (`volkin.streams.Stream.read_payload`).
Received = bytes | bytearray


class Op(IntEnum):
    READ = 1
    WRITE = 2
    FLUSH = 3
    ZERO = 4
    COPY = 5  # into the request's extent, from a local extent or a peer's; always durable
    MAP = 6  # where the range holds data: `encode_map` ranges (the rest are holes)


class Flag(IntFlag):
    FUA = 1  # WRITE, ZERO: durable before the reply
    PUNCH_HOLE = 2  # ZERO: also free the space (trim)


NO_FLAGS = Flag(0)


class WireError(Exception):
    """The peer broke the protocol; the connection must be dropped."""


@dataclass(frozen=True)
class Request:
    op: Op
    flags: Flag
    id: int
    extent_id: str
    offset: int
    length: int
    epoch: int

    def mutates(self) -> bool:
        return self.op != Op.READ


@dataclass(frozen=True)
class Response:
    id: int
    status: int  # 0: ok, else a gRPC status code
    message: str
    length: int  # bytes of data that follow (a READ's)


def encode_request(op: Op, request_id: int, extent_id: str, offset: int = 0, length: int = 0,
                   epoch: int = 0, flags: Flag = NO_FLAGS) -> bytes:
    name = extent_id.encode()
    if len(name) > MAX_EXTENT_ID:
        raise ValueError(f"extent id {extent_id!r} is longer than {MAX_EXTENT_ID} bytes")
    return _REQUEST.pack(REQUEST_MAGIC, op, flags, len(name), request_id, offset, length,
                         epoch) + name


def decode_request_header(data: bytes) -> tuple[Request, int]:
    """The request (without its extent id) and the extent id's length that follows."""
    magic, op, flags, name_length, request_id, offset, length, epoch = _REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise WireError(f"bad request magic {magic!r}")
    try:
        kind = Op(op)
    except ValueError:
        raise WireError(f"unknown operation {op}") from None
    if name_length > MAX_EXTENT_ID:
        raise WireError(f"extent id of {name_length} bytes")
    if kind in (Op.WRITE, Op.COPY) and length > MAX_DATA:
        raise WireError(f"write of {length} bytes; at most {MAX_DATA} per request")
    return Request(kind, Flag(flags), request_id, "", offset, length, epoch), name_length


def encode_response(request_id: int, status: int = 0, message: str = "",
                    length: int = 0) -> bytes:
    text = message.encode()[:MAX_MESSAGE]
    return _RESPONSE.pack(RESPONSE_MAGIC, status, 0, len(text), request_id, length) + text


def decode_response_header(data: bytes) -> tuple[Response, int]:
    """The response (without its message) and the message's length that follows."""
    magic, status, _, message_length, request_id, length = _RESPONSE.unpack(data)
    if magic != RESPONSE_MAGIC:
        raise WireError(f"bad response magic {magic!r}")
    if length > MAX_DATA:
        raise WireError(f"response of {length} bytes; at most {MAX_DATA}")
    return Response(request_id, status, "", length), message_length


_MAP_RANGE = struct.Struct(">QQ")
MAX_MAP_RANGES = MAX_DATA // _MAP_RANGE.size


def encode_map(ranges: list[tuple[int, int]]) -> bytes:
    """A MAP answer: the (offset, length) ranges that hold data, in order."""
    return b"".join(_MAP_RANGE.pack(*r) for r in ranges)


def decode_map(payload: Received) -> list[tuple[int, int]]:
    if len(payload) % _MAP_RANGE.size:
        raise WireError(f"a map of {len(payload)} bytes")
    return [_MAP_RANGE.unpack_from(payload, i) for i in range(0, len(payload),
                                                                _MAP_RANGE.size)]


@dataclass(frozen=True)
class CopySpec:
    """What a COPY request's payload says: where from, and which ranges."""

    source_extent_id: str
    source_agent: str  # the peer's gRPC address; empty: the source is on this agent
    source_data_address: str  # the peer's block data port, if it has one
    ranges: tuple[tuple[int, int, int], ...]  # (source offset, target offset, length)


_COPY_RANGE = struct.Struct(">QQQ")
MAX_RANGES = 4096


def encode_copy(spec: CopySpec) -> bytes:
    parts = []
    for text in (spec.source_extent_id, spec.source_agent, spec.source_data_address):
        raw = text.encode()
        parts.append(struct.pack(">H", len(raw)) + raw)
    parts.append(struct.pack(">I", len(spec.ranges)))
    parts.extend(_COPY_RANGE.pack(*r) for r in spec.ranges)
    return b"".join(parts)


def decode_copy(payload: Received) -> CopySpec:
    try:
        position = 0
        texts = []
        for _ in range(3):
            (length,) = struct.unpack_from(">H", payload, position)
            texts.append(payload[position + 2:position + 2 + length].decode())
            position += 2 + length
        (count,) = struct.unpack_from(">I", payload, position)
        position += 4
        if count > MAX_RANGES or position + count * _COPY_RANGE.size != len(payload):
            raise WireError(f"a copy of {count} ranges does not fit its {len(payload)} bytes")
        ranges = tuple(_COPY_RANGE.unpack_from(payload, position + i * _COPY_RANGE.size)
                       for i in range(count))
    except (struct.error, UnicodeDecodeError) as exc:
        raise WireError(f"malformed copy request: {exc}") from None
    return CopySpec(texts[0], texts[1], texts[2], ranges)
