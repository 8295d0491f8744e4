"""The NBD server: every volume of the core is an export named after the volume.

One task per connection: the fixed newstyle handshake, then requests served
one at a time in the order they arrive (simple replies). Protocol parsing is
`controller.nbd.protocol`; this module only moves bytes. A request the core
refuses gets an NBD error reply and the connection goes on; a client that
breaks the protocol is disconnected.

The server listens for the whole life of the process, but serves only while a
core is attached (this controller leads): a standby answers every option with
NBD_REP_ERR_SHUTDOWN, and stepping down (`detach`) closes every connection at
once, without answering what is in flight. A connection is bound to the volume
it opened — its unique id and negotiated size, not its name — so a volume that
is deleted (and perhaps created again under the same name) is never written
through an old connection. Nothing is acknowledged unless the term's fence is
valid at that moment; a request that cannot complete within `io_wait` seconds
(an agent or etcd away) gets EIO, and one that failed for want of space (an
agent's disk or etcd's database full) gets ENOSPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from controller.core import Core
from controller.fence import Deposed
from controller.nbd import protocol as p
from volkin.errors import NotFound, OutOfRange, StorageFull, Unavailable, VolkinError
from volkin.log import event

log = logging.getLogger("volkin.nbd")
STANDBY = "this volkin controller is a standby; connect to the active controller"


class Exports(Mapping[str, p.ExportInfo]):
    """The volumes as NBD exports, looked up one at a time: a client's NBD_OPT_GO must
    not build the list of 10,000 volumes (only NBD_OPT_LIST walks them)."""

    def __init__(self, core: Core) -> None:
        self._core = core

    def __getitem__(self, name: str) -> p.ExportInfo:
        volume = self._core.engine.graph.volumes.get(name)
        if volume is None or name in self._core.hidden:
            raise KeyError(name)
        return p.ExportInfo(name, volume.size_blocks * volume.block_size, volume.block_size)

    def __iter__(self) -> Iterator[str]:
        return (n for n in sorted(self._core.engine.graph.volumes) if n not in self._core.hidden)

    def __len__(self) -> int:
        return len(self._core.engine.graph.volumes) - len(self._core.hidden)


@dataclass(frozen=True)
class Binding:
    """What a connection in the transmission phase is bound to."""

    export: p.ExportInfo
    uid: int


class _Connection:
    def __init__(self, task: asyncio.Task[None], writer: asyncio.StreamWriter) -> None:
        self.task = task
        self.writer = writer
        self.volume = ""  # set once the client chose an export

    def close(self) -> None:
        self.task.cancel()
        transport = self.writer.transport
        if transport is not None:
            transport.abort()


class NbdServer:
    def __init__(self, core: Core | None = None, io_wait: float = 30.0) -> None:
        self.core = core
        self.io_wait = io_wait
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._by_volume: dict[str, set[_Connection]] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        self.detach()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- terms and volumes --------------------------------------------------------------
    def attach(self, core: Core) -> None:
        """Serves `core`'s volumes from now on (this controller leads)."""
        self.core = core

    def detach(self) -> None:
        """Stops serving: every connection is closed at once, nothing more is answered."""
        self.core = None
        for connection in list(self._connections):
            connection.close()

    def connections(self, volume: str) -> int:
        return len(self._by_volume.get(volume, ()))

    def disconnect(self, volume: str) -> int:
        """Closes every connection to `volume`; returns how many there were."""
        closing = list(self._by_volume.get(volume, ()))
        for connection in closing:
            connection.close()
        return len(closing)

    def exports(self, core: Core) -> Exports:
        return Exports(core)

    # -- one connection -----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(task, writer)
        self._connections.add(connection)
        try:
            binding = await self._negotiate(reader, writer)
            if binding is not None:
                connection.volume = binding.export.name
                self._by_volume.setdefault(connection.volume, set()).add(connection)
                await self._transmit(binding, reader, writer)
        except (p.ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            event(log, "nbd.disconnected", peer=peer, reason=str(exc))
        except (Deposed, Unavailable) as exc:
            # Deposed, or unable to prove the lease for io_wait: what is in flight stays
            # unanswered (its outcome is unknown to the client, as after a crash).
            event(log, "nbd.closed", logging.WARNING, peer=peer, reason=exc.message)
        except asyncio.CancelledError:
            pass  # closed by detach or disconnect
        finally:
            self._connections.discard(connection)
            if connection.volume:
                sharing = self._by_volume.get(connection.volume, set())
                sharing.discard(connection)
                if not sharing:
                    self._by_volume.pop(connection.volume, None)
            writer.close()

    async def _negotiate(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> Binding | None:
        writer.write(p.greeting())
        await writer.drain()
        flags = p.parse_client_flags(await reader.readexactly(4))
        no_zeroes = bool(flags & p.HANDSHAKE_NO_ZEROES)
        while True:
            option, length = p.parse_option_header(await reader.readexactly(16))
            data = await reader.readexactly(length)
            core = self.core
            if core is None and option != p.Option.ABORT:
                if option == p.Option.EXPORT_NAME:
                    return None  # no error reply exists for it: close
                writer.write(p.option_reply(option, p.Rep.ERR_SHUTDOWN, STANDBY.encode()))
                await writer.drain()
                continue
            outcome = p.handle_option(option, data, self.exports(core) if core else {},
                                      no_zeroes)
            writer.write(outcome.reply)
            await writer.drain()
            if outcome.close:
                return None
            if outcome.export is not None and core is not None:
                uid, _ = core.identity(outcome.export.name)
                return Binding(outcome.export, uid)

    async def _transmit(self, binding: Binding, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        export = binding.export
        while True:
            request = p.parse_request(await reader.readexactly(p.REQUEST_SIZE))
            payload = b""
            if request.command == p.Cmd.WRITE:
                if request.length > p.MAX_REQUEST_LENGTH:
                    raise p.ProtocolError(f"write of {request.length} bytes is too large")
                payload = await reader.readexactly(request.length)
            if request.command == p.Cmd.DISC:
                return
            core = self.core
            if core is None:
                raise Deposed("this controller stepped down")
            error = p.check_request(request, export.size)
            data = b""
            gone = False
            if not error:
                try:
                    core.require(export.name, binding.uid)
                    async with asyncio.timeout(self.io_wait):
                        data = await self._execute(core, export.name, request, payload)
                except Deposed:
                    raise  # nothing is answered by a controller that no longer leads
                except NotFound as exc:
                    event(log, "nbd.volume_gone", logging.WARNING, volume=export.name,
                          error=exc.message)
                    error, gone = p.Errno.ESHUTDOWN, True
                except OutOfRange:
                    error = p.Errno.EINVAL
                except (VolkinError, TimeoutError) as exc:
                    # The plan stopped where it failed; the maps in etcd say what is valid.
                    message = (exc.message if isinstance(exc, VolkinError)
                               else f"not done within io_wait={self.io_wait:g} s")
                    event(log, "nbd.failed", logging.WARNING, op=p.Cmd(request.command).name,
                          volume=export.name, error=message)
                    error = p.Errno.ENOSPC if isinstance(exc, StorageFull) else p.Errno.EIO
            # The acknowledgement: only while this term can prove it still leads.
            await core.fence.ready(self.io_wait)
            writer.write(p.simple_reply(request.handle, error, data))
            await writer.drain()
            if gone:
                return

    async def _execute(self, core: Core, name: str, request: p.Request, payload: bytes) -> bytes:
        fua = bool(request.flags & p.CmdFlag.FUA)
        if request.command == p.Cmd.READ:
            return await core.read(name, request.offset, request.length)
        if request.command == p.Cmd.WRITE:
            await core.write(name, request.offset, payload, fua)
        elif request.command == p.Cmd.WRITE_ZEROES:
            await core.write(name, request.offset, bytes(request.length), fua)
        elif request.command == p.Cmd.FLUSH:
            await core.flush(name)
        # TRIM is a hint (the protocol lets a server ignore it); space is not reclaimed yet.
        return b""

