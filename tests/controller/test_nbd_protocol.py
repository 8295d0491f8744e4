"""The NBD protocol module without sockets: negotiation, requests, and garbage."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.nbd import protocol as p

EXPORTS = {"v1": p.ExportInfo("v1", 1 << 20, 65536), "v2": p.ExportInfo("v2", 4096, 4096)}


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, option, rep, length = struct.unpack_from(">QIII", data)
        assert magic == p.OPTION_REPLY_MAGIC
        out.append((option, rep, data[20:20 + length]))
        data = data[20 + length:]
    return out


def test_the_greeting_offers_fixed_newstyle_without_zeroes() -> None:
    greeting = p.greeting()
    assert greeting[:8] == b"NBDMAGIC"
    assert struct.unpack(">QH", greeting[8:]) == (p.IHAVEOPT, 3)


def test_client_flags_are_parsed_and_unknown_ones_refused() -> None:
    assert p.parse_client_flags(struct.pack(">I", 0)) == 0  # the older newstyle: served
    with pytest.raises(p.ProtocolError):
        p.parse_client_flags(struct.pack(">I", 1 | 1 << 7))
    assert p.parse_client_flags(struct.pack(">I", 3)) == 3


def test_go_describes_the_export_and_enters_transmission() -> None:
    outcome = p.handle_option(p.Option.GO, go_data("v1", p.Info.BLOCK_SIZE), EXPORTS,
                              p.Session(no_zeroes=True))
    assert outcome.export == EXPORTS["v1"]
    (o1, r1, export), (o2, r2, sizes), (o3, r3, _) = replies(outcome.reply)
    assert o1 == o2 == o3 == p.Option.GO
    assert r1 == p.Rep.INFO
    assert struct.unpack(">HQH", export) == (p.Info.EXPORT, 1 << 20, p.TRANSMISSION_FLAGS)
    assert struct.unpack(">HIII", sizes) == (p.Info.BLOCK_SIZE, 1, 65536, p.MAX_REQUEST_LENGTH)
    assert (r2, r3) == (p.Rep.INFO, p.Rep.ACK)


@pytest.mark.parametrize(("volume_block", "preferred"), [
    (4096, 4096), (65536, 65536), (16 << 20, 16 << 20), (64 << 20, 32 << 20),
    (1536, 512), (3000, 512), (0, 512)])
def test_the_preferred_block_size_is_a_power_of_two_within_the_limits(
        volume_block: int, preferred: int) -> None:
    # Volumes made before block sizes were checked at create (1536, 64 MiB) still get
    # constraints that clients accept: a power of two, at most the maximum.
    assert p.preferred_block(volume_block) == preferred
    assert preferred & (preferred - 1) == 0 and 512 <= preferred <= p.MAX_REQUEST_LENGTH


def test_info_describes_without_entering_transmission() -> None:
    outcome = p.handle_option(p.Option.INFO, go_data("v2"), EXPORTS, p.Session(no_zeroes=True))
    assert outcome.export is None and not outcome.close
    assert [r for _, r, _ in replies(outcome.reply)] == [p.Rep.INFO, p.Rep.ACK]


def test_an_unknown_export_is_an_error_reply_not_a_disconnect() -> None:
    outcome = p.handle_option(p.Option.GO, go_data("nope"), EXPORTS, p.Session(no_zeroes=True))
    assert outcome.export is None and not outcome.close
    [(_, rep, message)] = replies(outcome.reply)
    assert rep == p.Rep.ERR_UNKNOWN and b"nope" in message


def test_list_names_every_export_then_acks() -> None:
    outcome = p.handle_option(p.Option.LIST, b"", EXPORTS, p.Session(no_zeroes=True))
    listed = [(rep, data[4:]) for _, rep, data in replies(outcome.reply)]
    assert listed == [(p.Rep.SERVER, b"v1"), (p.Rep.SERVER, b"v2"), (p.Rep.ACK, b"")]


def test_unsupported_options_are_answered_unsup() -> None:
    for option in (5, 11, 12345):  # STARTTLS, EXTENDED_HEADERS and nonsense
        [(_, rep, _)] = replies(p.handle_option(option, b"", EXPORTS, p.Session()).reply)
        assert rep == p.Rep.ERR_UNSUP


def meta_data(export: str, *queries: str) -> bytes:
    out = struct.pack(">I", len(export)) + export.encode() + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


def test_structured_replies_then_base_allocation_are_negotiated() -> None:
    session = p.Session()
    chosen = p.handle_option(p.Option.SET_META_CONTEXT, meta_data("v1", "base:allocation"),
                             EXPORTS, session)
    [(_, rep, _)] = replies(chosen.reply)
    assert rep == p.Rep.ERR_INVALID and not session.allocation  # structured replies first
    [(_, rep, _)] = replies(p.handle_option(p.Option.STRUCTURED_REPLY, b"", EXPORTS,
                                            session).reply)
    assert rep == p.Rep.ACK and session.structured
    assert session.transmission_flags() & p.TxFlag.SEND_DF
    listed = replies(p.handle_option(p.Option.LIST_META_CONTEXT, meta_data("v1"), EXPORTS,
                                     session).reply)
    assert [(r, d[4:]) for _, r, d in listed] == [
        (p.Rep.META_CONTEXT, b"base:allocation"), (p.Rep.ACK, b"")]
    none = replies(p.handle_option(p.Option.SET_META_CONTEXT, meta_data("v1", "x-other:y"),
                                   EXPORTS, session).reply)
    assert [r for _, r, _ in none] == [p.Rep.ACK] and not session.allocation
    chosen = p.handle_option(p.Option.SET_META_CONTEXT,
                             meta_data("v1", "x-other:y", "base:allocation"), EXPORTS, session)
    (_, r1, context), (_, r2, _) = replies(chosen.reply)
    assert (r1, r2) == (p.Rep.META_CONTEXT, p.Rep.ACK)
    assert context == struct.pack(">I", p.BASE_ALLOCATION_ID) + b"base:allocation"
    assert session.allocation
    [(_, rep, _)] = replies(p.handle_option(p.Option.SET_META_CONTEXT, meta_data("nope"),
                                            EXPORTS, session).reply)
    assert rep == p.Rep.ERR_UNKNOWN
    short = struct.pack(">I", 9) + b"v"  # a name of 9 bytes that has 1
    [(_, rep, _)] = replies(p.handle_option(p.Option.SET_META_CONTEXT, short, EXPORTS,
                                            session).reply)
    assert rep == p.Rep.ERR_INVALID


def test_block_status_needs_a_meta_context_and_df_needs_structured_replies() -> None:
    def check(session: p.Session, command: int, flags: int = 0) -> int:
        return p.check_request(p.Request(flags, command, 7, 0, 4096), 8192, session)

    plain, structured = p.Session(), p.Session(structured=True)
    chosen = p.Session(structured=True, allocation=True)
    assert check(plain, p.Cmd.BLOCK_STATUS) == p.Errno.EINVAL
    assert check(structured, p.Cmd.BLOCK_STATUS) == p.Errno.EINVAL
    assert check(chosen, p.Cmd.BLOCK_STATUS, p.CmdFlag.REQ_ONE) == 0
    assert check(plain, p.Cmd.READ, p.CmdFlag.DF) == p.Errno.EINVAL
    assert check(structured, p.Cmd.READ, p.CmdFlag.DF) == 0


def test_structured_chunks_are_built_as_the_protocol_says() -> None:
    head = p.read_chunk_header(42, 8192, 4)
    assert struct.unpack(">IHHQIQ", head) == (
        p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.ReplyType.OFFSET_DATA, 42, 12, 8192)
    error = p.error_chunk(43, p.Errno.EIO, "agent away")
    assert struct.unpack(">IHHQIIH", error[:26]) == (
        p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.ReplyType.ERROR, 43, 16, p.Errno.EIO, 10)
    assert error[26:] == b"agent away"
    status = p.block_status_chunk(44, [(65536, p.STATE_HOLE | p.STATE_ZERO), (4096, 0)])
    assert struct.unpack(">IHHQIIIIII", status) == (
        p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.ReplyType.BLOCK_STATUS, 44, 20,
        p.BASE_ALLOCATION_ID, 65536, 3, 4096, 0)


def test_export_name_answers_size_and_flags_with_or_without_zeroes() -> None:
    outcome = p.handle_option(p.Option.EXPORT_NAME, b"v2", EXPORTS, p.Session())
    assert outcome.export == EXPORTS["v2"]
    assert outcome.reply == struct.pack(">QH", 4096, p.TRANSMISSION_FLAGS) + bytes(124)
    assert p.handle_option(p.Option.EXPORT_NAME, b"x", EXPORTS, p.Session(no_zeroes=True)).close


def test_requests_out_of_range_or_with_unknown_flags_get_errors() -> None:
    def check(command: int, offset: int, length: int, flags: int = 0) -> int:
        return p.check_request(p.Request(flags, command, 7, offset, length), 4096)

    assert check(p.Cmd.READ, 0, 4096) == 0
    assert check(p.Cmd.READ, 1, 4096) == p.Errno.EINVAL
    assert check(p.Cmd.WRITE, 4095, 2) == p.Errno.ENOSPC
    assert check(p.Cmd.WRITE, 0, 512, p.CmdFlag.FUA) == 0
    assert check(p.Cmd.READ, 0, 512, p.CmdFlag.FUA) == 0  # FUA is valid on every command
    assert check(p.Cmd.READ, 0, 512, p.CmdFlag.NO_HOLE) == p.Errno.EINVAL
    assert check(p.Cmd.WRITE_ZEROES, 0, 512, p.CmdFlag.FAST_ZERO | p.CmdFlag.NO_HOLE) == 0
    assert check(p.Cmd.CACHE, 0, 4096) == 0
    assert check(99, 0, 0) == p.Errno.EINVAL
    assert check(p.Cmd.FLUSH, 0, 0) == 0


def test_zeroes_trims_and_caches_may_span_the_export_reads_and_writes_not() -> None:
    size = 1 << 40

    def check(command: int, length: int) -> int:
        return p.check_request(p.Request(0, command, 7, 0, length), size)

    big = 2**32 - 1  # the largest length a request can carry
    assert check(p.Cmd.WRITE_ZEROES, big) == 0
    assert check(p.Cmd.TRIM, big) == 0
    assert check(p.Cmd.CACHE, big) == 0
    assert check(p.Cmd.READ, p.MAX_REQUEST_LENGTH + 1) == p.Errno.EOVERFLOW
    assert check(p.Cmd.WRITE, p.MAX_REQUEST_LENGTH + 1) == p.Errno.EINVAL
    assert p.check_request(p.Request(0, p.Cmd.TRIM, 7, size - 4096, 8192), size) == p.Errno.EINVAL


def test_a_request_is_parsed_and_a_reply_is_built() -> None:
    raw = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 1, p.Cmd.WRITE, 42, 8192, 512)
    assert p.parse_request(raw) == p.Request(1, p.Cmd.WRITE, 42, 8192, 512)
    with pytest.raises(p.ProtocolError):
        p.parse_request(b"\0" * p.REQUEST_SIZE)
    assert p.simple_reply(42, 5) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 5, 42)


@settings(deadline=None)
@given(option=st.integers(0, 2**32 - 1), data=st.binary(max_size=300))
def test_any_option_data_gets_a_well_formed_answer(option: int, data: bytes) -> None:
    outcome = p.handle_option(option, data, EXPORTS, p.Session(no_zeroes=True))
    if option == p.Option.EXPORT_NAME:
        return  # answered with export data or a close, not option replies
    for answered, rep, _ in replies(outcome.reply):
        assert answered == option
        assert rep in set(p.Rep)


@settings(deadline=None)
@given(header=st.binary(min_size=16, max_size=16))
def test_any_option_header_parses_or_is_a_protocol_error(header: bytes) -> None:
    try:
        option, length = p.parse_option_header(header)
    except p.ProtocolError:
        return
    assert header[:8] == struct.pack(">Q", p.IHAVEOPT)
    assert option == struct.unpack(">I", header[8:12])[0]
    assert 0 <= length <= p.MAX_OPTION_LENGTH
