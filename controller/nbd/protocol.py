"""The NBD protocol, server side, without sockets: bytes in, bytes and decisions out.

Fixed newstyle negotiation (NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST,
NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_STARTTLS
and the meta context options for `base:allocation`; every other option is
answered NBD_REP_ERR_UNSUP), the older non-fixed newstyle (NBD_OPT_EXPORT_NAME
only, as the protocol allows, and only without TLS), and simple or structured
replies in the transmission phase, with NBD_CMD_BLOCK_STATUS once a meta context
is chosen.

TLS follows the protocol's FORCEDTLS mode when the server has certificates
(`Session.tls_required`): before NBD_OPT_STARTTLS every option but ABORT is
answered NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME, which has no error
reply, ends the connection. Without certificates the server is in NOTLS mode
and answers NBD_OPT_STARTTLS with NBD_REP_ERR_UNSUP, as servers without TLS do
(the protocol allows it or NBD_REP_ERR_POLICY; clients treat both alike).

The server in `controller.nbd.server` reads exact byte counts from its socket
and hands them here, so everything a client can send is parsed by pure functions
that tests (and fuzzers) call directly. Numbers are from the NBD protocol document
(NetworkBlockDevice/nbd, doc/proto.md); everything is big-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # the one meta context: its id in NBD_REP_META_CONTEXT replies

HANDSHAKE_FIXED_NEWSTYLE = 1 << 0
HANDSHAKE_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = HANDSHAKE_FIXED_NEWSTYLE | HANDSHAKE_NO_ZEROES

MAX_OPTION_LENGTH = 64 * 1024  # options are names and short lists; anything longer is abuse
MAX_NAME_LENGTH = 4096
MAX_REQUEST_LENGTH = 32 * 1024 * 1024  # of a READ or a WRITE: the payload
# Block size constraints (NBD_INFO_BLOCK_SIZE): any byte range works, a volume block is
# the preferred unit up to this (the protocol wants it a power of two <= the maximum).
MIN_BLOCK = 1
MAX_PREFERRED_BLOCK = MAX_REQUEST_LENGTH


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7


class Info(IntEnum):
    EXPORT = 0
    BLOCK_SIZE = 3


class TxFlag(IntEnum):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntEnum):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1


REPLY_FLAG_DONE = 1
STATE_HOLE = 1  # base:allocation: not allocated
STATE_ZERO = 2  # base:allocation: reads as zeros


class Errno(IntEnum):
    EPERM = 1
    EIO = 5
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# Multi-conn: every connection sees every acknowledged write, and a FLUSH on any one
# makes durable what all of them completed (controller.nbd.server).
# CACHE is accepted and needs nothing (reads come from the agents' page cache);
# FAST_ZERO is answered ENOTSUP where zeroing would be no faster than writing zeros.
TRANSMISSION_FLAGS = (TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA
                      | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.CAN_MULTI_CONN
                      | TxFlag.SEND_CACHE | TxFlag.SEND_FAST_ZERO)
# Flags each command may carry; anything else is EINVAL. FUA is accepted on every
# command (the protocol demands it once SEND_FUA is advertised) and means nothing where
# nothing is written.
ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: CmdFlag.FUA,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
# With structured replies a READ also takes DF: it is always answered in one chunk.
STRUCTURED_FLAGS: dict[int, int] = {Cmd.READ: CmdFlag.FUA | CmdFlag.DF}
# Commands that carry or return a payload: their length is limited to
# MAX_REQUEST_LENGTH; the others (TRIM, WRITE_ZEROES, CACHE) may span the export.
_PAYLOAD = (Cmd.READ, Cmd.WRITE)


class ProtocolError(Exception):
    """The client broke the protocol; the connection must be dropped."""


@dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int
    preferred_block: int


@dataclass
class Session:
    """What a connection negotiated so far."""

    no_zeroes: bool = False
    structured: bool = False  # NBD_OPT_STRUCTURED_REPLY was acknowledged
    allocation: bool = False  # base:allocation was chosen (NBD_OPT_SET_META_CONTEXT)
    tls_required: bool = False  # FORCEDTLS: nothing but STARTTLS and ABORT before TLS
    tls: bool = False  # NBD_OPT_STARTTLS was acknowledged: TLS from then on, or nothing

    def transmission_flags(self) -> int:
        return TRANSMISSION_FLAGS | (TxFlag.SEND_DF if self.structured else 0)

    def needs_tls(self) -> bool:
        """Options other than STARTTLS and ABORT are refused until TLS is up."""
        return self.tls_required and not self.tls


@dataclass(frozen=True)
class OptionOutcome:
    """What the server sends back for one option, and what happens next."""

    reply: bytes
    export: ExportInfo | None = None  # set: enter the transmission phase on this export
    close: bool = False  # the client aborted, or the connection must end
    # Set: once the reply is sent the server starts the TLS handshake, reading nothing
    # in plaintext before it (the client may send nothing until it has the reply).
    start_tls: bool = False
    tls_refused: bool = False  # refused because TLS is required first (FORCEDTLS)


@dataclass(frozen=True)
class Request:
    flags: int
    command: int
    handle: int
    offset: int
    length: int


# -- handshake ---------------------------------------------------------------------
def greeting() -> bytes:
    return NBDMAGIC + struct.pack(">QH", IHAVEOPT, HANDSHAKE_FIXED_NEWSTYLE | HANDSHAKE_NO_ZEROES)


def parse_client_flags(data: bytes) -> int:
    """The client's flags. Without HANDSHAKE_FIXED_NEWSTYLE the client speaks the older
    newstyle: its only option is NBD_OPT_EXPORT_NAME, and no option gets a reply."""
    (flags,) = struct.unpack(">I", data)
    if flags & ~CLIENT_FLAGS_KNOWN:
        raise ProtocolError(f"unknown client flags {flags:#x}")
    return int(flags)


def refusal(flags: int, session: Session) -> str:
    """Why a client with these flags cannot be served ('' if it can): TLS needs fixed
    newstyle negotiation, so a server that requires TLS cannot serve the older one."""
    if session.tls_required and not flags & HANDSHAKE_FIXED_NEWSTYLE:
        return "TLS is required, and a client without fixed newstyle negotiation cannot start it"
    return ""


def preferred_block(volume_block: int) -> int:
    """The preferred block size to advertise for a volume's block size: the largest power
    of two that divides it, at most MAX_PREFERRED_BLOCK (and at least 512)."""
    largest = volume_block & -volume_block if volume_block > 0 else 512
    return max(512, min(largest, MAX_PREFERRED_BLOCK))


def parse_option_header(data: bytes) -> tuple[int, int]:
    """The option and the length of its data, from the 16-byte option header."""
    magic, option, length = struct.unpack(">QII", data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    if length > MAX_OPTION_LENGTH:
        raise ProtocolError(f"option {option} carries {length} bytes, more than any option needs")
    return int(option), int(length)


def option_name(option: int) -> str:
    """NBD_OPT_GO for 7, and the number for options volkin does not know."""
    try:
        return f"NBD_OPT_{Option(option).name}"
    except ValueError:
        return str(option)


def option_reply(option: int, rep: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, option, rep, len(data)) + data


def handle_option(option: int, data: bytes, exports: Mapping[str, ExportInfo],
                  session: Session) -> OptionOutcome:
    """The answer to one option (changing `session` where the option negotiates
    something); never raises for bad option data (it answers an error)."""
    if option == Option.ABORT:
        return OptionOutcome(option_reply(option, Rep.ACK), close=True)
    if option == Option.STARTTLS:
        return _start_tls(data, session)
    if session.needs_tls():
        if option == Option.EXPORT_NAME:
            # No error reply exists for NBD_OPT_EXPORT_NAME: the server closes.
            return OptionOutcome(b"", close=True, tls_refused=True)
        return OptionOutcome(option_reply(option, Rep.ERR_TLS_REQD, TLS_REQUIRED.encode()),
                             tls_refused=True)
    if option == Option.LIST:
        if data:
            return _error(option, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        replies = b"".join(
            option_reply(option, Rep.SERVER, struct.pack(">I", len(n.encode())) + n.encode())
            for n in sorted(exports))
        return OptionOutcome(replies + option_reply(option, Rep.ACK))
    if option == Option.EXPORT_NAME:
        export = exports.get(data.decode("utf-8", "replace"))
        if export is None:
            # No error reply exists for NBD_OPT_EXPORT_NAME: the server closes.
            return OptionOutcome(b"", close=True)
        reply = struct.pack(">QH", export.size, session.transmission_flags())
        return OptionOutcome(reply + (b"" if session.no_zeroes else bytes(124)), export=export)
    if option in (Option.INFO, Option.GO):
        return _info_or_go(option, data, exports, session)
    if option == Option.STRUCTURED_REPLY:
        if data:
            return _error(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        session.structured = True
        return OptionOutcome(option_reply(option, Rep.ACK))
    if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
        return _meta_context(option, data, exports, session)
    return _error(option, Rep.ERR_UNSUP, f"option {option} is not supported by volkin")


TLS_REQUIRED = "this server requires TLS: send NBD_OPT_STARTTLS first"


def _start_tls(data: bytes, session: Session) -> OptionOutcome:
    option = Option.STARTTLS
    if not session.tls_required:
        return _error(option, Rep.ERR_UNSUP, "this server is not configured for TLS")
    if session.tls:
        return _error(option, Rep.ERR_INVALID, "TLS is already started")
    if data:
        return _error(option, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
    # Nothing negotiated in plaintext survives the upgrade (the protocol forbids it, as a
    # man in the middle could have chosen it); the client's handshake flags stay.
    session.structured = session.allocation = False
    session.tls = True
    return OptionOutcome(option_reply(option, Rep.ACK), start_tls=True)


def _meta_context(option: int, data: bytes, exports: Mapping[str, ExportInfo],
                  session: Session) -> OptionOutcome:
    """LIST or SET of meta contexts: volkin has one, base:allocation."""
    if not session.structured:
        return _error(option, Rep.ERR_INVALID, "meta contexts need structured replies first")
    try:
        (name_length,) = struct.unpack_from(">I", data)
        if name_length > MAX_NAME_LENGTH:
            raise ValueError("export name too long")
        name = data[4:4 + name_length].decode("utf-8", "replace")
        position = 4 + name_length
        (count,) = struct.unpack_from(">I", data, position)
        position += 4
        queries = []
        for _ in range(count):
            (length,) = struct.unpack_from(">I", data, position)
            queries.append(data[position + 4:position + 4 + length].decode("utf-8", "replace"))
            position += 4 + length
        if position != len(data):
            raise ValueError("trailing bytes")
    except (struct.error, ValueError):
        return _error(option, Rep.ERR_INVALID, "meta context request does not fit its length")
    if name not in exports:
        return _error(option, Rep.ERR_UNKNOWN, f"no volume named {name!r}")
    if option == Option.LIST_META_CONTEXT:
        chosen = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
    else:
        chosen = BASE_ALLOCATION in queries
        session.allocation = chosen
    reply = b""
    if chosen:
        reply = option_reply(option, Rep.META_CONTEXT, struct.pack(">I", BASE_ALLOCATION_ID)
                             + BASE_ALLOCATION.encode())
    return OptionOutcome(reply + option_reply(option, Rep.ACK))


def _info_or_go(option: int, data: bytes, exports: Mapping[str, ExportInfo],
                session: Session) -> OptionOutcome:
    if len(data) < 6:
        return _error(option, Rep.ERR_INVALID, "option data too short")
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > MAX_NAME_LENGTH or 4 + name_length + 2 > len(data):
        return _error(option, Rep.ERR_INVALID, "export name length does not fit the option")
    name = data[4:4 + name_length].decode("utf-8", "replace")
    (count,) = struct.unpack_from(">H", data, 4 + name_length)
    if len(data) != 4 + name_length + 2 + 2 * count:
        return _error(option, Rep.ERR_INVALID, "information request list does not fit")
    requested = struct.unpack_from(f">{count}H", data, 4 + name_length + 2)
    export = exports.get(name)
    if export is None:
        return _error(option, Rep.ERR_UNKNOWN, f"no volume named {name!r}")
    replies = option_reply(option, Rep.INFO, struct.pack(
        ">HQH", Info.EXPORT, export.size, session.transmission_flags()))
    if Info.BLOCK_SIZE in requested:
        # Any byte range works (sub-block writes are read-modify-write); whole
        # volume blocks are what avoids that.
        replies += option_reply(option, Rep.INFO, struct.pack(
            ">HIII", Info.BLOCK_SIZE, MIN_BLOCK, preferred_block(export.preferred_block),
            MAX_REQUEST_LENGTH))
    replies += option_reply(option, Rep.ACK)
    return OptionOutcome(replies, export=export if option == Option.GO else None)


def _error(option: int, rep: int, message: str) -> OptionOutcome:
    return OptionOutcome(option_reply(option, rep, message.encode()))


# -- transmission --------------------------------------------------------------------
REQUEST_SIZE = 28


def parse_request(data: bytes) -> Request:
    magic, flags, command, handle, offset, length = struct.unpack(">IHHQQI", data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(int(flags), int(command), int(handle), int(offset), int(length))


def check_request(request: Request, size: int, session: Session | None = None) -> int:
    """0 if the request may be served, else the NBD error to answer it with."""
    allowed = ALLOWED_FLAGS.get(request.command)  # IntEnum keys: plain ints find them
    if session is not None and session.structured:
        allowed = STRUCTURED_FLAGS.get(request.command, allowed)
    if allowed is None or request.flags & ~allowed:
        return Errno.EINVAL
    if request.command == Cmd.BLOCK_STATUS and not (session and session.allocation):
        return Errno.EINVAL  # no meta context was chosen
    if request.command in (Cmd.DISC, Cmd.FLUSH):
        return 0
    if request.command in _PAYLOAD and request.length > MAX_REQUEST_LENGTH:
        return Errno.EOVERFLOW if request.command == Cmd.READ else Errno.EINVAL
    if request.offset + request.length > size:
        return Errno.ENOSPC if request.command == Cmd.WRITE else Errno.EINVAL
    return 0


def simple_reply(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle) + data


def chunk_header(handle: int, kind: int, length: int, done: bool = True) -> bytes:
    """The header of a structured reply chunk whose payload (`length` bytes) follows."""
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                       kind, handle, length)


def read_chunk_header(handle: int, offset: int, length: int) -> bytes:
    """A READ's one NBD_REPLY_TYPE_OFFSET_DATA chunk, up to its data (`length` bytes)."""
    return chunk_header(handle, ReplyType.OFFSET_DATA, 8 + length) + struct.pack(">Q", offset)


def error_chunk(handle: int, error: int, message: str = "") -> bytes:
    text = message.encode()[:MAX_NAME_LENGTH]
    return (chunk_header(handle, ReplyType.ERROR, 6 + len(text))
            + struct.pack(">IH", error, len(text)) + text)


def block_status_chunk(handle: int, extents: list[tuple[int, int]]) -> bytes:
    """base:allocation's extents (length, flags) as one NBD_REPLY_TYPE_BLOCK_STATUS chunk."""
    body = struct.pack(">I", BASE_ALLOCATION_ID) + b"".join(
        struct.pack(">II", length, flags) for length, flags in extents)
    return chunk_header(handle, ReplyType.BLOCK_STATUS, len(body)) + body
