"""The NBD server: every volume of the core is an export named after the volume.

One task per connection: the fixed newstyle handshake, then requests served
one at a time in the order they arrive (simple replies). Protocol parsing is
`controller.nbd.protocol`; this module only moves bytes. A request the core
refuses gets an NBD error reply and the connection goes on; a client that
breaks the protocol is disconnected.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from controller.core import Core
from controller.nbd import protocol as p
from volkin.errors import OutOfRange, VolkinError

log = logging.getLogger("volkin.nbd")


class NbdServer:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def exports(self) -> dict[str, p.ExportInfo]:
        return {v.name: p.ExportInfo(v.name, v.size_blocks * v.block_size, v.block_size)
                for v in self.core.engine.volumes()}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            export = await self._negotiate(reader, writer)
            if export is not None:
                await self._transmit(export, reader, writer)
        except (p.ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("nbd client %s disconnected: %s", peer, exc)
        finally:
            writer.close()

    async def _negotiate(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> p.ExportInfo | None:
        writer.write(p.greeting())
        await writer.drain()
        flags = p.parse_client_flags(await reader.readexactly(4))
        no_zeroes = bool(flags & p.HANDSHAKE_NO_ZEROES)
        while True:
            option, length = p.parse_option_header(await reader.readexactly(16))
            data = await reader.readexactly(length)
            outcome = p.handle_option(option, data, self.exports(), no_zeroes)
            writer.write(outcome.reply)
            await writer.drain()
            if outcome.close:
                return None
            if outcome.export is not None:
                return outcome.export

    async def _transmit(self, export: p.ExportInfo, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        while True:
            request = p.parse_request(await reader.readexactly(p.REQUEST_SIZE))
            payload = b""
            if request.command == p.Cmd.WRITE:
                if request.length > p.MAX_REQUEST_LENGTH:
                    raise p.ProtocolError(f"write of {request.length} bytes is too large")
                payload = await reader.readexactly(request.length)
            if request.command == p.Cmd.DISC:
                return
            error = p.check_request(request, export.size)
            data = b""
            if not error:
                try:
                    data = await self._execute(export.name, request, payload)
                except OutOfRange:
                    error = p.Errno.EINVAL
                except (VolkinError, grpc.RpcError) as exc:
                    # The plan stopped where it failed; the maps in etcd say what is valid.
                    log.warning("nbd %s on %s failed: %s", p.Cmd(request.command).name,
                                export.name, exc)
                    error = p.Errno.EIO
            writer.write(p.simple_reply(request.handle, error, data))
            await writer.drain()

    async def _execute(self, name: str, request: p.Request, payload: bytes) -> bytes:
        fua = bool(request.flags & p.CmdFlag.FUA)
        if request.command == p.Cmd.READ:
            return await self.core.read(name, request.offset, request.length)
        if request.command == p.Cmd.WRITE:
            await self.core.write(name, request.offset, payload, fua)
        elif request.command == p.Cmd.WRITE_ZEROES:
            await self.core.write(name, request.offset, bytes(request.length), fua)
        elif request.command == p.Cmd.FLUSH:
            await self.core.flush(name)
        # TRIM is a hint (the protocol lets a server ignore it); space is not reclaimed yet.
        return b""
