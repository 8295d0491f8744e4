"""The NBD server: every volume of a block device is an export named after the volume.

One task reads a connection's requests; each request then runs in a task of its
own, so many are in flight and they complete out of order, as the protocol
allows (`controller.nbd.ordering` keeps the orders a client may rely on:
overlapping requests where either writes, and a FLUSH after every write received
before it). Answers are written whole, one at a time. Protocol parsing is
`controller.nbd.protocol`; the storage is a `controller.nbd.device.Device`; this
module only moves bytes between them. Connections are consistent with each
other (every one sees every write the moment it is acknowledged, and a FLUSH on
any covers them all), so multi-conn is advertised and clients open several.

The server listens for the whole life of the process, but serves only while a
device is attached (this controller leads): a standby answers every option with
NBD_REP_ERR_SHUTDOWN, and stepping down (`detach`) closes every connection at
once, without answering what is in flight. A connection is bound to the volume
it opened — its unique id and negotiated size, not its name — so a volume that
is deleted (and perhaps created again under the same name) is never written
through an old connection. Nothing is acknowledged unless the device says so
(the term's fence is valid); a request that cannot complete within `io_wait`
seconds (an agent or etcd away) gets EIO; a request the device refuses gets an
NBD error reply and the connection goes on; a client that breaks the protocol
is disconnected.

With a `volkin.tls.Tls` the server demands TLS (the protocol's FORCEDTLS): a
client must send NBD_OPT_STARTTLS first and present a certificate the CA signed;
everything after the handshake runs as without TLS, on the encrypted stream.
A refused client costs one `nbd.tls_refused` line.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

from controller.fence import Deposed
from controller.metrics import NbdMetrics
from controller.nbd import protocol as p
from controller.nbd.device import Device, Volume
from controller.nbd.ordering import Entry, InFlight
from volkin import streams
from volkin.blockwire import Data, Received
from volkin.coalesce import CoalescingWriter
from volkin.errors import NotFound, OutOfRange, StorageFull, Unavailable, VolkinError
from volkin.log import event
from volkin.tls import Tls, ssl_peer_name

log = logging.getLogger("volkin.nbd")
STANDBY = "this volkin controller is a standby; connect to the active controller"
# Requests of one connection running at once; more wait in the socket.
IN_FLIGHT = 64
# Seconds a client has to complete the TLS handshake after NBD_OPT_STARTTLS.
HANDSHAKE_WAIT = 10.0


class _Connection:
    def __init__(self, task: asyncio.Task[None], stream: streams.Stream) -> None:
        self.task = task
        self.stream = stream
        self.peer = stream.get_extra_info("peername")
        self.client = ""  # the common name of the client's certificate, over TLS
        self.refused = False  # nbd.tls_refused was logged
        self.volume = ""  # set once the client chose an export

    def close(self) -> None:
        self.task.cancel()
        self.stream.abort()


def _client(connection: _Connection) -> dict[str, Any]:
    """The `client` field of a connection's log lines: its certificate's name, over TLS."""
    return {"client": connection.client} if connection.client else {}


def _handshake_failure(exc: BaseException) -> str:
    """One line on why a TLS handshake failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return f"TLS handshake failed: {exc or type(exc).__name__}"


# Commands that change the volume: they keep their order with overlapping requests.
_WRITES = (p.Cmd.WRITE, p.Cmd.WRITE_ZEROES, p.Cmd.TRIM)


def _reply(out: CoalescingWriter, session: p.Session, request: p.Request, error: int,
           data: Data) -> None:
    """Writes the answer to `request`: with structured replies, a READ's data or any
    error as a chunk (a BLOCK_STATUS answer is one already); else a simple reply."""
    if session.structured and error:
        out.write(p.error_chunk(request.handle, error))
    elif request.command == p.Cmd.BLOCK_STATUS:
        out.write(data)
    elif session.structured and request.command == p.Cmd.READ:
        out.write(p.read_chunk_header(request.handle, request.offset, len(data)))
        out.write(data)
    else:
        out.write(p.simple_reply(request.handle, error))
        if data:
            out.write(data)


def _length(request: p.Request) -> int:
    """The bytes a request other than a READ counts: its range (a FLUSH has none)."""
    return 0 if request.command == p.Cmd.FLUSH else request.length


class _Stop(Exception):
    """Ends a connection without another answer (deposed, or the volume is gone)."""


class _NotFast(Exception):
    """A WRITE_ZEROES with FAST_ZERO that would be no faster than writing zeros."""


class _Refused(Exception):
    """The client cannot be served without TLS, or failed its handshake (logged)."""


class NbdServer:
    def __init__(self, device: Device | None = None, io_wait: float = 30.0,
                 metrics: NbdMetrics | None = None, *, tls: Tls | None = None) -> None:
        self.device = device
        self.io_wait = io_wait
        self.metrics = metrics or NbdMetrics()
        self.tls = tls
        # One context for every connection: `tls` loads renewed files into it in place.
        self._tls_context = tls.server_context() if tls is not None else None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._by_volume: dict[str, set[_Connection]] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await streams.start_server(self._serve, host, port)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        self.detach()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- terms and volumes --------------------------------------------------------------
    def attach(self, device: Device) -> None:
        """Serves `device`'s volumes from now on (this controller leads)."""
        self.device = device

    def detach(self) -> None:
        """Stops serving: every connection is closed at once, nothing more is answered."""
        self.device = None
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

    # -- one connection -----------------------------------------------------------------
    async def _serve(self, stream: streams.Stream) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(task, stream)
        peer = connection.peer
        self._connections.add(connection)
        try:
            opened = await self._negotiate(connection)
            if opened is not None:
                device, volume, session = opened
                connection.volume = volume.export.name
                self._by_volume.setdefault(connection.volume, set()).add(connection)
                await self._transmit(device, volume, stream, session)
        except (p.ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            event(log, "nbd.disconnected", peer=peer, reason=str(exc),
                  **_client(connection))
        except (_Stop, Deposed, Unavailable) as exc:
            # Deposed, unable to prove the lease for io_wait, or the volume is gone: what
            # is in flight stays unanswered (its outcome is unknown, as after a crash).
            event(log, "nbd.closed", logging.WARNING, peer=peer,
                  reason=getattr(exc, "message", str(exc)), **_client(connection))
        except _Refused:
            pass  # logged where it was decided
        except asyncio.CancelledError:
            pass  # closed by detach or disconnect
        finally:
            self._connections.discard(connection)
            if connection.volume:
                sharing = self._by_volume.get(connection.volume, set())
                sharing.discard(connection)
                if not sharing:
                    self._by_volume.pop(connection.volume, None)
            stream.close()

    async def _negotiate(self, connection: _Connection
                         ) -> tuple[Device, Volume, p.Session] | None:
        stream = connection.stream
        stream.write(p.greeting())
        await stream.drain()
        flags = p.parse_client_flags(await stream.readexactly(4))
        session = p.Session(no_zeroes=bool(flags & p.HANDSHAKE_NO_ZEROES),
                            tls_required=self.tls is not None)
        refusal = p.refusal(flags, session)
        if refusal:
            raise self._refusal(connection, refusal)
        while True:
            option, length = p.parse_option_header(await stream.readexactly(16))
            data = await stream.readexactly(length)
            if not flags & p.HANDSHAKE_FIXED_NEWSTYLE and option != p.Option.EXPORT_NAME:
                # The older newstyle has no option replies: nothing to answer it with.
                raise p.ProtocolError(f"option {option} from a client without fixed newstyle "
                                      f"negotiation, which allows only NBD_OPT_EXPORT_NAME")
            device = self.device
            if (device is None and option not in (p.Option.ABORT, p.Option.STARTTLS)
                    and not session.needs_tls()):
                if option == p.Option.EXPORT_NAME:
                    return None  # no error reply exists for it: close
                stream.write(p.option_reply(option, p.Rep.ERR_SHUTDOWN, STANDBY.encode()))
                await stream.drain()
                continue
            outcome = p.handle_option(option, data, device.exports() if device else {},
                                      session)
            if outcome.start_tls:
                await self._start_tls(connection, outcome.reply)
                continue
            stream.write(outcome.reply)
            await stream.drain()
            if outcome.tls_refused:
                refused = self._refusal(connection, f"option {p.option_name(option)} before "
                                                    f"NBD_OPT_STARTTLS (a client without TLS)")
                if outcome.close:
                    raise refused
            if outcome.close:
                return None
            if outcome.export is not None and device is not None:
                return device, device.open(outcome.export.name), session

    async def _start_tls(self, connection: _Connection, ack: bytes) -> None:
        """Acknowledges NBD_OPT_STARTTLS and runs the handshake, which must prove a
        client certificate the CA signed; refuses the client if it fails."""
        stream = connection.stream
        assert self.tls is not None and self._tls_context is not None
        if stream.buffered:
            # The client sent more before our answer: a plaintext tail the handshake
            # would not cover.
            raise p.ProtocolError("data after NBD_OPT_STARTTLS before its reply")
        self.tls.material()  # loads renewed files into the context (at most once a second)
        # No await between the ack and the handshake: the next bytes the client sends
        # are its TLS hello, and only asyncio's TLS layer may read them.
        stream.write(ack)
        try:
            await stream.start_tls(self._tls_context, server_side=True,
                                   timeout=HANDSHAKE_WAIT)
        except (ssl.SSLError, OSError) as exc:  # OSError: lost, or HANDSHAKE_WAIT passed
            raise self._refusal(connection, _handshake_failure(exc)) from None
        connection.client = ssl_peer_name(stream.get_extra_info("ssl_object"))

    @staticmethod
    def _refusal(connection: _Connection, reason: str) -> _Refused:
        """Logs that a client was refused for want of TLS (once per connection: a client
        without TLS may try several options); returns what ends the connection, for the
        caller to raise where it must end."""
        if not connection.refused:
            connection.refused = True
            event(log, "nbd.tls_refused", logging.WARNING, peer=connection.peer,
                  reason=reason)
        return _Refused(reason)

    async def _transmit(self, device: Device, volume: Volume, stream: streams.Stream,
                        session: p.Session) -> None:
        in_flight = InFlight()
        slots = asyncio.Semaphore(IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()
        stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        out = CoalescingWriter(stream)  # the answers of one turn leave in one send
        try:
            while not stopped.done():
                request = p.parse_request(await stream.readexactly(p.REQUEST_SIZE))
                started = time.perf_counter()
                payload: Received = b""
                if request.command == p.Cmd.WRITE:
                    if request.length > p.MAX_REQUEST_LENGTH:
                        raise p.ProtocolError(f"write of {request.length} bytes is too large")
                    payload = await stream.read_payload(request.length)
                if request.command == p.Cmd.DISC:
                    await in_flight.drain()
                    return
                if self.device is not device:
                    raise _Stop("this controller stepped down")
                error = p.check_request(request, volume.export.size, session)
                if error:
                    await device.acknowledge(self.io_wait)
                    _reply(out, session, request, error, b"")
                    self.metrics.answered(request.command, error, 0, started)
                    continue
                await slots.acquire()
                if request.command == p.Cmd.FLUSH:
                    entry = in_flight.register_flush()
                else:
                    entry = in_flight.register(request.offset, request.length,
                                               writes=request.command in _WRITES)
                one = asyncio.create_task(self._serve_one(
                    device, volume, session, request, payload, entry, in_flight, slots, out,
                    stream, stopped, started))
                running.add(one)
                one.add_done_callback(running.discard)
        finally:
            for one in running:  # a client gone, a connection closed: nobody to answer
                one.cancel()
            if stopped.done():
                reason = stopped.exception()
                if reason is not None:
                    raise reason

    async def _serve_one(self, device: Device, volume: Volume, session: p.Session,
                         request: p.Request, payload: Received, entry: Entry,
                         in_flight: InFlight,
                         slots: asyncio.Semaphore, out: CoalescingWriter,
                         stream: streams.Stream, stopped: asyncio.Future[None],
                         started: float) -> None:
        flush = request.command == p.Cmd.FLUSH
        answered = False
        try:
            await in_flight.wait(entry, flush)
            error, data = await self._execute(volume, request, payload)
            # The acknowledgement: only while this term can prove it still leads.
            await device.acknowledge(self.io_wait)
            _reply(out, session, request, error, data)
            answered = True
            self.metrics.answered(request.command, error, len(data) if request.command
                                  == p.Cmd.READ else _length(request), started)
            if error == p.Errno.ESHUTDOWN:
                raise _Stop(f"volume {volume.export.name} is gone")
        except (_Stop, Deposed, Unavailable) as exc:
            if not stopped.done():
                stopped.set_exception(exc)
            stream.abort()  # wakes the reader, which ends the connection
        finally:
            if not answered:
                self.metrics.unanswered(request.command)
            in_flight.finish(entry)
            slots.release()

    async def _execute(self, volume: Volume, request: p.Request,
                       payload: Received) -> tuple[int, Data]:
        """The error to answer (0: none) and the data of a READ."""
        try:
            volume.check()
            async with asyncio.timeout(self.io_wait):
                return 0, await self._call(volume, request, payload)
        except Deposed:
            raise  # nothing is answered by a controller that no longer leads
        except NotFound as exc:
            event(log, "nbd.volume_gone", logging.WARNING, volume=volume.export.name,
                  error=exc.message)
            return p.Errno.ESHUTDOWN, b""
        except OutOfRange:
            return p.Errno.EINVAL, b""
        except _NotFast:
            return p.Errno.ENOTSUP, b""
        except StorageFull as exc:
            # e.g. etcd's database is full (NOSPACE): a write that needs a map commit
            # cannot be made durable; say so, not EIO.
            event(log, "nbd.failed", logging.WARNING, op=p.Cmd(request.command).name,
                  volume=volume.export.name, error=exc.message)
            return p.Errno.ENOSPC, b""
        except (VolkinError, TimeoutError) as exc:
            # The plan stopped where it failed; the maps in etcd say what is valid.
            message = (exc.message if isinstance(exc, VolkinError)
                       else f"not done within io_wait={self.io_wait:g} s")
            event(log, "nbd.failed", logging.WARNING, op=p.Cmd(request.command).name,
                  volume=volume.export.name, error=message)
            return p.Errno.EIO, b""

    @staticmethod
    async def _call(volume: Volume, request: p.Request, payload: Received) -> Data:
        fua = bool(request.flags & p.CmdFlag.FUA)
        if request.command == p.Cmd.READ:
            return await volume.read(request.offset, request.length)
        if request.command == p.Cmd.WRITE:
            await volume.write(request.offset, payload, fua)
        elif request.command == p.Cmd.WRITE_ZEROES:
            fast = bool(request.flags & p.CmdFlag.FAST_ZERO)
            if not await volume.zero(request.offset, request.length, fua, fast):
                raise _NotFast()
        elif request.command == p.Cmd.FLUSH:
            await volume.flush()
        elif request.command == p.Cmd.BLOCK_STATUS:
            extents = await volume.extents(request.offset, request.length)
            if request.flags & p.CmdFlag.REQ_ONE:
                extents = extents[:1]
            return p.block_status_chunk(request.handle, extents)
        elif request.command == p.Cmd.TRIM:
            await volume.trim(request.offset, request.length, fua)
        # CACHE asks for nothing that reads would not already get from the agents' caches.
        return b""

