"""NBD clients of the fault suite: real libnbd connections that tell the model each outcome.

libnbd's asynchronous API gives the exact fate of every write: a success reply
(acknowledged), an error reply or a lost connection (outcome unknown). A
`Writer` is a thread that keeps a few writes in flight to the blocks it owns,
finds the leader in etcd, and after any connection error (or when its writes
stall while etcd names another leader) gives the connection up, counts what was
in flight as unknown, and reconnects to whoever leads. `QueuedWrites` are the
split brain's writes, sent on a connection to a controller that is stopped and
no longer leads: they must never be acknowledged and never land.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from tests.faults.cluster import Cluster, Leader
from tests.faults.model import CELL, Model, WriteRecord, cell_bytes
from tests.support.libnbd import load
from tests.support.tls import libnbd_tls

nbd: ModuleType = load()

# Writes a writer keeps in flight (on distinct blocks).
DEPTH = 2
# Least time between two writes of one writer: keeps 2-4 writers from saturating a
# 2-core machine, so that the faults, not the load, decide how long I/O stalls.
MIN_INTERVAL = 0.02
# A write without a reply for this long makes the writer look who leads now.
STALL_CHECK = 1.0
# A write without a reply for this long is given up whoever leads (io-wait is 20 s).
STALL_LIMIT = 60.0
CONNECT_TIMEOUT = 2.0


class ConnectionLost(Exception):
    pass


@dataclass
class Request:
    """One NBD write: consecutive cells, one write id each."""

    records: list[WriteRecord]
    buffer: Any  # nbd.Buffer, kept alive until the reply
    issued: float
    block: int = -1


@dataclass
class Connection:
    """A libnbd handle connected to one controller's export of one volume."""

    handle: Any
    volume: str
    leader: Leader
    connected: float
    pending: dict[int, Request] = field(default_factory=dict)

    @staticmethod
    def open(leader: Leader, volume: str, timeout: float = CONNECT_TIMEOUT) -> Connection:
        """Connects (handshake included) within `timeout`; raises ConnectionLost."""
        host, _, port = leader.nbd.rpartition(":")
        handle = nbd.NBD()
        try:
            libnbd_tls(handle, nbd)
            handle.set_export_name(volume)
            handle.aio_connect_tcp(host, port)
            deadline = time.monotonic() + timeout
            while not handle.aio_is_ready():
                if handle.aio_is_dead() or handle.aio_is_closed():
                    raise ConnectionLost(f"handshake with {leader.nbd} failed")
                if time.monotonic() > deadline:
                    raise ConnectionLost(f"no handshake with {leader.nbd} in {timeout}s")
                handle.poll(50)
        except nbd.Error as exc:
            raise ConnectionLost(f"cannot connect to {leader.nbd}/{volume}: {exc}") from exc
        return Connection(handle, volume, leader, time.time())

    def write(self, model: Model, cells: list[int], by: str, block: int = -1,
              never: bool = False) -> Request:
        """Sends one write of consecutive `cells` (not waiting); raises ConnectionLost."""
        now = time.time()
        records: list[WriteRecord] = []
        for cell in cells:
            record = model.issue(self.volume, cell, by, never=never, at=now)
            record.controller, record.pid = self.leader.nbd, self.leader.pid
            record.connected = self.connected
            record.pending_seen = now  # any reply is sent after the request went out
            record.request = records[0].id if records else record.id
            records.append(record)
        data = b"".join(cell_bytes(r.id, r.cell) for r in records)
        buffer = nbd.Buffer.from_bytearray(bytearray(data))
        request = Request(records, buffer, now, block)
        try:
            cookie = self.handle.aio_pwrite(buffer, cells[0] * CELL)
        except nbd.Error as exc:
            for record in records:  # never sent, so it cannot land: unknown is generous
                model.unknown(record, f"not sent: {exc}")
            raise ConnectionLost(f"write not sent: {exc}") from exc
        self.pending[cookie] = request
        return request

    def poll(self, timeout_ms: int = 50) -> tuple[list[tuple[Request, str]], str]:
        """Waits for replies. Returns the requests that completed, each with "" if it was
        acknowledged or else the error; and why the connection died ("" if it lives)."""
        seen = time.time()
        lost = ""
        try:
            self.handle.poll(timeout_ms)
        except nbd.Error as exc:
            lost = str(exc)
        done: list[tuple[Request, str]] = []
        for cookie, request in list(self.pending.items()):
            try:
                completed = self.handle.aio_command_completed(cookie)
            except nbd.Error as exc:
                done.append((request, f"failed: {exc}"))
                del self.pending[cookie]
                continue
            if completed:
                done.append((request, ""))
                del self.pending[cookie]
            else:
                for record in request.records:
                    record.pending_seen = seen
        if not lost and (self.handle.aio_is_dead() or self.handle.aio_is_closed()):
            lost = "connection closed"
        return done, lost

    def close(self) -> None:
        self.handle = None  # libnbd closes the socket when the handle goes
        self.pending.clear()

    def oldest(self) -> float:
        return min((r.issued for r in self.pending.values()), default=0.0)


def settle(model: Model, done: list[tuple[Request, str]], at: float) -> None:
    """Tells the model how the writes of a live connection ended."""
    for request, error in done:
        for record in request.records:
            if error:
                model.unknown(record, error, at=at)
            else:
                model.acknowledged(record, at=at)


class Writer(threading.Thread):
    """Writes the blocks it owns of one volume, through whichever controller leads.

    A connection it gives up is not closed at once: it stays open, unwaited for, so
    that a late reply to what was in flight is seen. The model already counts those
    writes as unknown; a late acknowledgement is recorded on the write (`late_ack`),
    and `Model.deposed_acks` says whether a deposed controller sent it.
    """

    def __init__(self, name: str, volume: str, blocks: list[int], cells_per_block: int,
                 model: Model, cluster: Cluster, rng: random.Random) -> None:
        super().__init__(name=f"writer-{name}", daemon=True)
        self.writer = name
        self.volume = volume
        self.blocks = blocks
        self.cells_per_block = cells_per_block
        self.model = model
        self.cluster = cluster
        self.rng = rng
        self.acks: list[float] = []  # when each request was acknowledged (wall clock)
        self.errors = 0
        self.reconnects = 0
        self.late_acks = 0
        self.failure: BaseException | None = None
        self.notes: list[str] = []
        self._conn: Connection | None = None
        self._given_up: list[tuple[float, Connection]] = []
        self._hold = threading.Event()
        self._ending = threading.Event()
        self._quiet = threading.Event()  # held with nothing in flight
        self._next_write = 0.0
        self._next_leader_check = 0.0

    def __repr__(self) -> str:
        return f"{self.writer} on {self.volume}"

    # -- control (from the trial's thread) ---------------------------------------------
    def hold(self) -> None:
        """Stops issuing writes (what is in flight goes on); see `wait_quiet`."""
        self._hold.set()

    def wait_quiet(self, timeout: float) -> None:
        """Returns once the writer is held with nothing in flight."""
        if not self._quiet.wait(timeout):
            raise TimeoutError(f"{self!r}: writes still in flight after {timeout:.0f}s")

    def resume(self) -> None:
        self._quiet.clear()
        self._hold.clear()

    def finish(self, timeout: float) -> None:
        """Lets what is in flight resolve, then ends the thread."""
        self._ending.set()
        self._hold.set()
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"{self!r} did not finish within {timeout:.0f}s")

    def acks_since(self, at: float) -> int:
        return sum(1 for t in self.acks if t > at)

    # -- the thread ----------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by the trial
            self.failure = exc
        finally:
            if self._conn is not None:
                self._give_up("writer ended")
            for _, conn in self._given_up:
                conn.close()
            self._quiet.set()

    def _loop(self) -> None:
        while True:
            self._watch_given_up()
            in_flight = self._conn is not None and bool(self._conn.pending)
            if self._hold.is_set() and not in_flight:
                if self._ending.is_set():
                    return
                self._quiet.set()
                time.sleep(0.02)
                continue
            if self._conn is None:
                self._connect()
                continue
            if not self._hold.is_set():
                self._issue()
            self._poll()

    def _connect(self) -> None:
        leader = self.cluster.leader()
        if leader is None:
            time.sleep(0.1)
            return
        try:
            self._conn = Connection.open(leader, self.volume)
            self.reconnects += 1
        except ConnectionLost:
            time.sleep(0.1)

    def _issue(self) -> None:
        assert self._conn is not None
        busy = {r.block for r in self._conn.pending.values()}
        now = time.monotonic()
        if len(busy) >= DEPTH or now < self._next_write:
            return
        block = self.rng.choice([b for b in self.blocks if b not in busy])
        first = block * self.cells_per_block
        if self.rng.random() < 0.3:
            cells = list(range(first, first + self.cells_per_block))  # the whole block
        else:
            count = self.rng.randint(1, min(4, self.cells_per_block))
            start = first + self.rng.randrange(self.cells_per_block - count + 1)
            cells = list(range(start, start + count))
        self._next_write = now + MIN_INTERVAL
        try:
            self._conn.write(self.model, cells, self.writer, block)
        except ConnectionLost as exc:
            self._give_up(str(exc))

    def _poll(self) -> None:
        conn = self._conn
        assert conn is not None
        done, lost = conn.poll()
        now = time.time()
        settle(self.model, done, now)
        for _request, error in done:
            if error:
                self.errors += 1
                self._next_write = time.monotonic() + 0.1  # back off a little after EIO
            else:
                self.acks.append(now)
        if lost:
            self._give_up(f"connection to {conn.leader.node_id} lost: {lost}")
            return
        if any(error for _, error in done):
            self._maybe_move(f"error reply from {conn.leader.node_id}", force=True)
        elif conn.pending:
            age = now - conn.oldest()
            if age > STALL_LIMIT:
                self._give_up(f"no reply from {conn.leader.node_id} in {STALL_LIMIT:.0f}s")
            elif age > STALL_CHECK:
                self._maybe_move(f"no reply from {conn.leader.node_id} for {age:.1f}s")

    def _maybe_move(self, why: str, force: bool = False) -> None:
        """Gives the connection up if etcd names another leader."""
        now = time.monotonic()
        if not force and now < self._next_leader_check:
            return
        self._next_leader_check = now + 0.3
        conn = self._conn
        leader = self.cluster.leader()
        if conn is not None and leader is not None and (
                leader.pid, leader.nbd) != (conn.leader.pid, conn.leader.nbd):
            self._give_up(f"{why}; etcd names {leader.node_id} (pid {leader.pid}) leader now")

    def _give_up(self, why: str) -> None:
        """What is in flight has an unknown outcome; keep watching it for late replies."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        now = time.time()
        for request in conn.pending.values():
            for record in request.records:
                self.model.unknown(record, why, at=now)
        if conn.pending and not self._ending.is_set():
            self._given_up.append((time.monotonic(), conn))
        else:
            conn.close()
        self.notes.append(f"+{now - self.model.start:.2f}s {why}")
        time.sleep(0.05)

    def _watch_given_up(self) -> None:
        for entry in list(self._given_up):
            since, conn = entry
            done, lost = conn.poll(0)
            now = time.time()
            for request, error in done:
                if not error:
                    self.late_acks += 1
                    for record in request.records:
                        record.late_ack = now
            if lost or not conn.pending or time.monotonic() - since > STALL_LIMIT:
                conn.close()
                self._given_up.remove(entry)


class QueuedWrites:
    """Writes queued on a connection to a controller that must no longer act on them."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.requests: list[Request] = []
        self.outcome = ""

    def queue(self, model: Model, cells: list[int]) -> None:
        self.requests.append(self.conn.write(model, cells, "queued", never=True))

    def wait(self, model: Model, timeout: float) -> None:
        """Waits until every queued write has a reply or the connection is gone."""
        deadline = time.monotonic() + timeout
        replies = []
        while self.conn.pending and time.monotonic() < deadline:
            done, lost = self.conn.poll(100)
            settle(model, done, time.time())
            replies += [error or "acknowledged" for _, error in done]
            if lost:
                self.outcome = f"connection lost ({lost})"
                break
        else:
            if self.conn.pending:
                self.outcome = f"no reply within {timeout:.0f}s"
        now = time.time()
        for request in self.conn.pending.values():
            for record in request.records:
                model.unknown(record, self.outcome, at=now)
        self.outcome = "; ".join([*replies, self.outcome] if self.outcome else replies)
        self.conn.close()


def with_connection(cluster: Cluster, volume: str, action: Callable[[Connection], bytes],
                    timeout: float, what: str) -> bytes:
    """Runs `action` on a fresh connection to the leader, retrying until `timeout`."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        leader = cluster.leader()
        if leader is None:
            last = "no leader in etcd"
            time.sleep(0.1)
            continue
        try:
            conn = Connection.open(leader, volume)
        except ConnectionLost as exc:
            last = str(exc)
            time.sleep(0.2)
            continue
        try:
            return action(conn)
        except nbd.Error as exc:
            last = f"{leader.node_id}: {exc}"
            time.sleep(0.2)
        finally:
            conn.close()
    raise TimeoutError(f"{what} on {volume}: not done within {timeout:.0f}s (last: {last})")


def write_cells(cluster: Cluster, model: Model, volume: str, cells: list[int], by: str,
                timeout: float = 30.0) -> None:
    """Writes consecutive `cells` of `volume` and waits for the acknowledgement, one MiB
    at a time (before any fault: an error fails the trial)."""
    chunk = (1 << 20) // CELL

    def write_all(conn: Connection) -> bytes:
        for pos in range(0, len(cells), chunk):
            part = cells[pos:pos + chunk]
            records = [model.issue(volume, c, by) for c in part]
            data = b"".join(cell_bytes(r.id, r.cell) for r in records)
            try:
                conn.handle.pwrite(data, part[0] * CELL)
            except nbd.Error as exc:
                for record in records:
                    model.unknown(record, f"{by}: {exc}")
                raise
            for record in records:
                model.acknowledged(record)
        return b""

    with_connection(cluster, volume, write_all, timeout, by)


def fill(cluster: Cluster, model: Model, volume: str, size: int) -> None:
    """Writes every cell of `volume`."""
    write_cells(cluster, model, volume, list(range(size // CELL)), "fill")


def read_volume(cluster: Cluster, volume: str, size: int, timeout: float = 60.0) -> bytes:
    """The whole volume as the current leader serves it."""

    def read_all(conn: Connection) -> bytes:
        step = 1 << 20
        return b"".join(bytes(conn.handle.pread(min(step, size - pos), pos))
                        for pos in range(0, size, step))

    return with_connection(cluster, volume, read_all, timeout, "read")
