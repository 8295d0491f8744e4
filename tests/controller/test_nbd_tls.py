"""NBD over TLS (STARTTLS, the protocol's FORCEDTLS mode): qemu-io, nbdinfo, nbdcopy and
libnbd with client certificates read and write volumes through the in-process server, over
real agents and etcd; a client without TLS, or with a certificate the CA did not sign or
that expired, is refused, with one `nbd.tls_refused` line, and the server serves on.

The option rules are checked on `controller.nbd.protocol` directly and over a socket
with a small client of our own (Python's ssl): what a FORCEDTLS server answers before
and after STARTTLS, and what ends the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from controller.core import Core
from controller.nbd import protocol as p
from controller.nbd.server import NbdServer
from controller.placement import Placement
from controller.volumes import CoreDevice
from tests.agent.conftest import AgentFactory
from tests.controller.conftest import agent_client, map_store
from tests.support import nbdtls
from tests.support.etcd import EtcdServer
from volkin import etcd, streams
from volkin.keys import Keys
from volkin.tls import Tls

MiB = 1 << 20
BLOCK = 64 * 1024
HOST = "127.0.0.1"
EXPORTS = {"v": p.ExportInfo("v", MiB, 4096)}


@pytest.fixture
def certs(tmp_path: Path) -> nbdtls.Certificates:
    return nbdtls.make(tmp_path / "pki")


# -- the clients ----------------------------------------------------------------------------
async def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=None if env is None else {**os.environ, **env})
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def tool(*argv: str) -> str:
    code, text = await run(*argv)
    assert code == 0, f"{argv} exited {code}:\n{text}"
    return text


def qemu_io_argv(port: int, export: str, certificates: Path | None,
                 *commands: str) -> list[str]:
    """qemu-io on an export, with TLS credentials from `certificates` (None: plaintext)."""
    argv = ["qemu-io"]
    options = f"driver=nbd,server.type=inet,server.host={HOST},server.port={port},export={export}"
    if certificates is not None:
        argv += ["--object", f"tls-creds-x509,id=tls0,dir={certificates},endpoint=client"]
        options += ",tls-creds=tls0"
    argv += ["--image-opts", options]
    for command in commands:
        argv += ["-c", command]
    return argv


async def qemu_io(port: int, export: str, certificates: Path, *commands: str) -> str:
    text = await tool(*qemu_io_argv(port, export, certificates, *commands))
    assert "verification failed" not in text, text
    return text


def nbds(port: int, export: str, certificates: Path) -> str:
    return f"nbds://{HOST}:{port}/{export}?tls-certificates={certificates}"


async def libnbd(url: str, body: str, before: str = "") -> list[str]:
    """The lines printed by `body`, run with libnbd's handle `h` (Debian's python3-libnbd,
    hence Debian's python) connected to `url` after `before` ran."""
    script = f"import sys, nbd\nh = nbd.NBD()\n{before}h.connect_uri(sys.argv[1])\n{body}"
    return (await tool("/usr/bin/python3", "-c", script, url)).split("\n")


def serve(etcd_server: EtcdServer, start_agent: AgentFactory, tls: Tls | None,
          scenario: Callable[[Core, int], Awaitable[None]]) -> None:
    """Runs `scenario(core, port)` against an NbdServer with `tls` on a real core."""
    a1, a2 = start_agent("a1"), start_agent("a2")

    async def main() -> None:
        client = await etcd.connect([etcd_server.endpoint])
        store = map_store(client)
        core = Core(await store.load(), store, Placement(["a1", "a2"]), agent_client(a1, a2),
                    Keys("/t"))
        server = NbdServer(CoreDevice(core), tls=tls)
        _, port = await server.start(HOST)
        try:
            await scenario(core, port)
        finally:
            await server.stop()
            await core.close()
            await client.close()

    asyncio.run(main())


def refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """The fields of every nbd.tls_refused line logged."""
    return [dict(getattr(r, "volkin_fields", {})) for r in caplog.records
            if r.getMessage() == "nbd.tls_refused"]


# -- with TLS, real clients read and write -----------------------------------------------------
@pytest.mark.integration
def test_qemu_io_with_a_client_certificate_writes_and_reads_back_over_tls(
        etcd_server: EtcdServer, start_agent: AgentFactory,
        certs: nbdtls.Certificates) -> None:
    async def scenario(core: Core, port: int) -> None:
        await core.create_volume("v", 8 * MiB, BLOCK)
        await qemu_io(port, "v", certs.good, "write -P 0x5a 0 4M", "write -P 0xa5 100000 3333",
                      "write -z 6M 128k", "flush")
        await qemu_io(port, "v", certs.good, "read -P 0x5a 0 100000",
                      "read -P 0xa5 100000 3333", "read -P 0x5a 103333 4090971",
                      "read -P 0 6M 128k")
        assert await core.read("v", 100000, 3333) == b"\xa5" * 3333

    serve(etcd_server, start_agent, certs.server, scenario)


@pytest.mark.integration
def test_nbdinfo_over_nbds_describes_the_volume_and_maps_its_holes(
        etcd_server: EtcdServer, start_agent: AgentFactory,
        certs: nbdtls.Certificates) -> None:
    async def scenario(core: Core, port: int) -> None:
        await core.create_volume("v", 4 * MiB, BLOCK)
        await qemu_io(port, "v", certs.good, "write -P 0x11 1M 1M")
        info = json.loads(await tool("nbdinfo", "--json", nbds(port, "v", certs.good)))
        export = info["exports"][0]
        assert export["export-size"] == 4 * MiB
        assert export["can_flush"] and export["can_fua"] and not export["is_read_only"]
        assert info["protocol"] == "newstyle-fixed" and info["TLS"] is True
        mapped = json.loads(await tool("nbdinfo", "--map", "--json", nbds(port, "v", certs.good)))
        runs = [(m["offset"], m["length"], m["type"]) for m in mapped]
        assert runs == [(0, MiB, 3), (MiB, MiB, 0), (2 * MiB, 2 * MiB, 3)], runs

    serve(etcd_server, start_agent, certs.server, scenario)


@pytest.mark.integration
def test_nbdcopy_over_nbds_copies_an_image_in_and_out_byte_for_byte(
        etcd_server: EtcdServer, start_agent: AgentFactory, certs: nbdtls.Certificates,
        tmp_path: Path) -> None:
    image, back = tmp_path / "in.raw", tmp_path / "out.raw"
    data = bytearray(8 * MiB)
    data[:3 * MiB] = bytes(range(256)) * (3 * MiB // 256)
    data[5 * MiB:5 * MiB + 12345] = b"\x77" * 12345
    image.write_bytes(data)

    async def scenario(core: Core, port: int) -> None:
        await core.create_volume("v", 8 * MiB, BLOCK)
        url = nbds(port, "v", certs.good)
        await tool("nbdcopy", "--flush", str(image), url)
        await tool("nbdcopy", url, str(back))
        assert back.read_bytes() == bytes(data)

    serve(etcd_server, start_agent, certs.server, scenario)


@pytest.mark.integration
def test_libnbd_requiring_tls_writes_reads_and_sees_block_status(
        etcd_server: EtcdServer, start_agent: AgentFactory,
        certs: nbdtls.Certificates) -> None:
    async def scenario(core: Core, port: int) -> None:
        await core.create_volume("v", 2 * MiB, BLOCK)
        out = await libnbd(f"nbd://{HOST}:{port}/v", before=(
            "h.set_tls(nbd.TLS_REQUIRE)\n"
            f"h.set_tls_certificates({str(certs.good)!r})\n"
            "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n"), body=(
            "h.pwrite(b'\\x42' * 65536, 65536)\n"
            "h.flush()\n"
            "print(h.get_tls_negotiated(), h.get_structured_replies_negotiated())\n"
            "print(h.pread(65536, 65536) == b'\\x42' * 65536)\n"
            "seen = []\n"
            "h.block_status(2 << 20, 0, lambda ctx, off, ents, err: seen.extend(ents))\n"
            "print(seen[:4])\n"
            "h.shutdown()\n"))
        assert out[0] == "True True", out
        assert out[1] == "True", out
        assert out[2] == f"[65536, {p.STATE_HOLE | p.STATE_ZERO}, 65536, 0]", out

    serve(etcd_server, start_agent, certs.server, scenario)


# -- with TLS, every other client is refused, and the server serves on -----------------------
@pytest.mark.integration
def test_nbdinfo_without_tls_is_refused_with_an_error_naming_tls(
        etcd_server: EtcdServer, start_agent: AgentFactory, certs: nbdtls.Certificates,
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(core: Core, port: int) -> None:
        await core.create_volume("v", MiB, BLOCK)
        # nbdinfo names TLS itself; libnbd shows the server's message in its debug output.
        code, text = await run("nbdinfo", f"nbd://{HOST}:{port}/v", env={"LIBNBD_DEBUG": "1"})
        assert code != 0 and "without TLS" in text, text
        assert "server error message: this server requires TLS" in text, text
        code, text = await run("nbdinfo", "--list", f"nbd://{HOST}:{port}",
                               env={"LIBNBD_DEBUG": "1"})
        assert code != 0 and "server error message: this server requires TLS" in text, text
        await qemu_io(port, "v", certs.good, "read -P 0 0 64k")

    serve(etcd_server, start_agent, certs.server, scenario)
    refused = refusals(caplog)
    assert len(refused) == 2 and all("before NBD_OPT_STARTTLS" in str(r["reason"])
                                     for r in refused), refused


@pytest.mark.integration
def test_qemu_io_without_tls_is_refused_with_an_error_naming_tls(
        etcd_server: EtcdServer, start_agent: AgentFactory, certs: nbdtls.Certificates,
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(core: Core, port: int) -> None:
        await core.create_volume("v", MiB, BLOCK)
        code, text = await run(*qemu_io_argv(port, "v", None, "write -P 0x66 0 64k"))
        assert code != 0 and "TLS" in text, text
        await qemu_io(port, "v", certs.good, "read -P 0 0 64k")  # nothing was written

    serve(etcd_server, start_agent, certs.server, scenario)
    assert len(refusals(caplog)) == 1


@pytest.mark.integration
def test_a_client_certificate_signed_by_another_ca_is_refused(
        etcd_server: EtcdServer, start_agent: AgentFactory, certs: nbdtls.Certificates,
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(core: Core, port: int) -> None:
        await core.create_volume("v", MiB, BLOCK)
        code, text = await run(*qemu_io_argv(port, "v", certs.foreign, "write -P 0x66 0 64k"))
        assert code != 0, text
        code, text = await run("nbdinfo", nbds(port, "v", certs.foreign))
        assert code != 0, text
        await qemu_io(port, "v", certs.good, "read -P 0 0 64k")

    serve(etcd_server, start_agent, certs.server, scenario)
    refused = refusals(caplog)
    assert len(refused) == 2, refused
    assert all("client certificate refused" in str(r["reason"]) for r in refused), refused
    assert all(r["peer"] for r in refused)


@pytest.mark.integration
def test_an_expired_client_certificate_is_refused(
        etcd_server: EtcdServer, start_agent: AgentFactory, certs: nbdtls.Certificates,
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(core: Core, port: int) -> None:
        await core.create_volume("v", MiB, BLOCK)
        # libnbd sends what it has (qemu would not use an expired certificate at all).
        code, text = await run("nbdinfo", nbds(port, "v", certs.expired))
        assert code != 0, text
        code, text = await run(*qemu_io_argv(port, "v", certs.expired, "read 0 64k"))
        assert code != 0 and "expired" in text, text
        await qemu_io(port, "v", certs.good, "read -P 0 0 64k")

    serve(etcd_server, start_agent, certs.server, scenario)
    [refused] = refusals(caplog)
    assert "expired" in str(refused["reason"]), refused


@pytest.mark.integration
def test_a_client_without_a_certificate_is_refused(
        etcd_server: EtcdServer, start_agent: AgentFactory, certs: nbdtls.Certificates,
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(core: Core, port: int) -> None:
        await core.create_volume("v", MiB, BLOCK)
        code, text = await run("nbdinfo", nbds(port, "v", certs.anonymous))
        assert code != 0, text
        await qemu_io(port, "v", certs.good, "read -P 0 0 64k")

    serve(etcd_server, start_agent, certs.server, scenario)
    [refused] = refusals(caplog)
    assert "CERTIFICATE" in str(refused["reason"]).upper(), refused


# -- without TLS, as before -------------------------------------------------------------------
@pytest.mark.integration
def test_a_server_without_tls_serves_plaintext_and_answers_starttls_unsupported(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, port: int) -> None:
        await core.create_volume("v", MiB, BLOCK)
        url = f"nbd://{HOST}:{port}/v"
        out = await libnbd(url, before="h.set_tls(nbd.TLS_ALLOW)\n", body=(
            "h.pwrite(b'\\x07' * 4096, 0)\n"
            "print(h.get_tls_negotiated(), h.pread(4096, 0) == b'\\x07' * 4096)\n"))
        assert out[0] == "False True", out
        # Asked outright, the server declines TLS and goes on in plaintext.
        client = await RawClient.connect(port)
        rep, message = await client.option(p.Option.STARTTLS)
        assert rep == p.Rep.ERR_UNSUP and b"not configured for TLS" in message
        client.send(p.Option.GO, struct.pack(">I", 1) + b"v" + struct.pack(">H", 0))
        assert [(await client.reply())[0] for _ in range(2)] == [p.Rep.INFO, p.Rep.ACK]
        client.stream.close()

    serve(etcd_server, start_agent, None, scenario)


# -- the option rules, on the protocol module ------------------------------------------------
def option_replies(outcome: p.OptionOutcome) -> list[tuple[int, bytes]]:
    out, data = [], outcome.reply
    while data:
        _, _, rep, length = struct.unpack_from(">QIII", data)
        out.append((rep, data[20:20 + length]))
        data = data[20 + length:]
    return out


def test_before_starttls_every_option_but_abort_is_answered_tls_required() -> None:
    for option in (p.Option.LIST, p.Option.INFO, p.Option.GO, p.Option.STRUCTURED_REPLY,
                   p.Option.LIST_META_CONTEXT, p.Option.SET_META_CONTEXT, 12345):
        session = p.Session(tls_required=True)
        outcome = p.handle_option(option, b"", EXPORTS, session)
        [(rep, message)] = option_replies(outcome)
        assert rep == p.Rep.ERR_TLS_REQD and b"STARTTLS" in message, option
        assert outcome.export is None and not outcome.close and not session.structured
        assert outcome.tls_refused
    aborted = p.handle_option(p.Option.ABORT, b"", EXPORTS, p.Session(tls_required=True))
    assert option_replies(aborted) == [(p.Rep.ACK, b"")] and aborted.close


def test_export_name_before_starttls_ends_the_connection_without_a_reply() -> None:
    outcome = p.handle_option(p.Option.EXPORT_NAME, b"v", EXPORTS, p.Session(tls_required=True))
    assert outcome.reply == b"" and outcome.close and outcome.export is None
    assert outcome.tls_refused


def test_starttls_is_acknowledged_once_and_forgets_what_plaintext_negotiated() -> None:
    session = p.Session(no_zeroes=True, structured=True, allocation=True, tls_required=True)
    outcome = p.handle_option(p.Option.STARTTLS, b"", EXPORTS, session)
    assert option_replies(outcome) == [(p.Rep.ACK, b"")] and outcome.start_tls
    assert session.tls and not session.structured and not session.allocation
    assert session.no_zeroes  # a handshake flag, not an option
    again = p.handle_option(p.Option.STARTTLS, b"", EXPORTS, session)
    assert [rep for rep, _ in option_replies(again)] == [p.Rep.ERR_INVALID]
    assert not again.start_tls
    go = p.handle_option(p.Option.GO, struct.pack(">I", 1) + b"v" + struct.pack(">H", 0),
                         EXPORTS, session)
    assert go.export == EXPORTS["v"]


def test_starttls_with_data_is_invalid_and_starts_nothing() -> None:
    session = p.Session(tls_required=True)
    outcome = p.handle_option(p.Option.STARTTLS, b"x", EXPORTS, session)
    assert [rep for rep, _ in option_replies(outcome)] == [p.Rep.ERR_INVALID]
    assert not outcome.start_tls and not session.tls


def test_without_tls_starttls_is_unsupported_and_nothing_needs_tls() -> None:
    session = p.Session()
    outcome = p.handle_option(p.Option.STARTTLS, b"", EXPORTS, session)
    [(rep, message)] = option_replies(outcome)
    assert rep == p.Rep.ERR_UNSUP and b"TLS" in message and not outcome.start_tls
    assert not session.needs_tls()


def test_a_client_without_fixed_newstyle_is_refused_only_when_tls_is_required() -> None:
    assert p.refusal(0, p.Session(tls_required=True))
    assert not p.refusal(p.HANDSHAKE_FIXED_NEWSTYLE, p.Session(tls_required=True))
    assert not p.refusal(0, p.Session())


# -- the option rules, over a socket ---------------------------------------------------------
class RawClient:
    """Just enough of an NBD client to send options one by one, over TLS once asked."""

    def __init__(self, stream: streams.Stream) -> None:
        self.stream = stream

    @classmethod
    async def connect(cls, port: int, flags: int = p.CLIENT_FLAGS_KNOWN) -> RawClient:
        stream = await streams.open_connection(HOST, port)
        greeting = await stream.readexactly(18)
        assert greeting[:8] == p.NBDMAGIC
        stream.write(struct.pack(">I", flags))
        return cls(stream)

    def send(self, option: int, data: bytes = b"", then: bytes = b"") -> None:
        self.stream.write(struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data + then)

    async def reply(self) -> tuple[int, bytes]:
        _, _, rep, length = struct.unpack(">QIII", await self.stream.readexactly(20))
        return rep, await self.stream.readexactly(length)

    async def option(self, option: int, data: bytes = b"") -> tuple[int, bytes]:
        self.send(option, data)
        return await self.reply()

    async def start_tls(self, certificates: Path) -> None:
        assert await self.option(p.Option.STARTTLS) == (p.Rep.ACK, b"")
        context = ssl.create_default_context(cafile=certificates / "ca-cert.pem")
        context.load_cert_chain(certificates / "client-cert.pem",
                                certificates / "client-key.pem")
        await self.stream.start_tls(context, server_side=False, server_hostname=HOST,
                                    timeout=10)

    async def closed(self) -> bytes:
        """What the server sent before it closed the connection."""
        received = b""
        try:
            while True:
                received += await self.stream.readexactly(1)
        except (asyncio.IncompleteReadError, ConnectionError):
            return received


def standby(tls: Tls, scenario: Callable[[int], Awaitable[None]]) -> None:
    """Runs `scenario(port)` against a standby server with `tls` (no device: every option
    after TLS is answered NBD_REP_ERR_SHUTDOWN)."""
    async def main() -> None:
        server = NbdServer(tls=tls)
        _, port = await server.start(HOST)
        try:
            await asyncio.wait_for(scenario(port), 20)
        finally:
            await server.stop()

    asyncio.run(main())


def test_options_before_starttls_get_tls_required_and_after_it_the_server_answers(
        certs: nbdtls.Certificates) -> None:
    async def scenario(port: int) -> None:
        client = await RawClient.connect(port)
        rep, message = await client.option(p.Option.LIST)
        assert rep == p.Rep.ERR_TLS_REQD and b"TLS" in message
        await client.start_tls(certs.good)
        rep, message = await client.option(p.Option.LIST)
        assert rep == p.Rep.ERR_SHUTDOWN and b"standby" in message  # over TLS now
        assert client.stream.get_extra_info("ssl_object") is not None

    standby(certs.server, scenario)


def test_starttls_a_second_time_is_invalid(certs: nbdtls.Certificates) -> None:
    async def scenario(port: int) -> None:
        client = await RawClient.connect(port)
        await client.start_tls(certs.good)
        rep, _ = await client.option(p.Option.STARTTLS)
        assert rep == p.Rep.ERR_INVALID
        assert await client.option(p.Option.ABORT) == (p.Rep.ACK, b"")

    standby(certs.server, scenario)


def test_the_client_certificates_name_is_on_its_connections_log_lines(
        certs: nbdtls.Certificates, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(port: int) -> None:
        client = await RawClient.connect(port)
        await client.start_tls(certs.good)
        client.stream.abort()  # gone mid-negotiation: the server logs why it ended
        await asyncio.sleep(0.1)

    with caplog.at_level(logging.INFO, logger="volkin.nbd"):
        standby(certs.server, scenario)
    ended = [dict(getattr(r, "volkin_fields", {})) for r in caplog.records
             if r.getMessage() == "nbd.disconnected"]
    assert [e.get("client") for e in ended] == ["good-client"], ended
    assert not refusals(caplog)


def test_export_name_before_starttls_closes_the_connection(
        certs: nbdtls.Certificates, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(port: int) -> None:
        client = await RawClient.connect(port)
        client.send(p.Option.EXPORT_NAME, b"v")
        assert await client.closed() == b""

    standby(certs.server, scenario)
    [refused] = refusals(caplog)
    assert "NBD_OPT_EXPORT_NAME" in str(refused["reason"]), refused


def test_a_client_without_fixed_newstyle_is_refused(
        certs: nbdtls.Certificates, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(port: int) -> None:
        client = await RawClient.connect(port, flags=p.HANDSHAKE_NO_ZEROES)
        assert await client.closed() == b""

    standby(certs.server, scenario)
    [refused] = refusals(caplog)
    assert "fixed newstyle" in str(refused["reason"]), refused


def test_bytes_sent_after_starttls_before_its_reply_close_the_connection(
        certs: nbdtls.Certificates) -> None:
    async def scenario(port: int) -> None:
        client = await RawClient.connect(port)
        # A plaintext option pipelined behind STARTTLS: the handshake would not cover it.
        client.send(p.Option.STARTTLS, then=struct.pack(">QII", p.IHAVEOPT, p.Option.LIST, 0))
        assert await client.closed() == b""

    standby(certs.server, scenario)


def test_a_client_that_never_completes_the_handshake_is_refused_after_the_wait(
        certs: nbdtls.Certificates, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.nbd import server
    monkeypatch.setattr(server, "HANDSHAKE_WAIT", 0.3)

    async def scenario(port: int) -> None:
        client = await RawClient.connect(port)
        assert await client.option(p.Option.STARTTLS) == (p.Rep.ACK, b"")
        assert await client.closed() == b""  # no hello from us: the server gives up

    with caplog.at_level(logging.WARNING):
        standby(certs.server, scenario)
    [refused] = refusals(caplog)
    assert "longer than 0.3 seconds" in str(refused["reason"]), refused
