"""Node-wide fencing: whether this agent may let a mutation change a byte, now.

A controller's fencing epoch grows by one at every takeover. The agent keeps one
highest epoch for the whole node and admits a mutation only if both hold:

1. **Its epoch is not older than the node's.** Lower: `FencedOut`, whatever extent it
   touches. Higher: the new epoch is recorded durably in DATA_DIR/node.json *before*
   the mutation runs, under the node gate held exclusive. Every mutation holds the
   gate shared from its check to the end of its I/O, so the exclusive holder first
   waits for every mutation in flight: once a newer epoch is recorded, nothing checked
   against an older one can still land, across restarts too (the epoch is on disk
   before anything is done under it).
2. **The agent can prove it would have seen a newer epoch** (its *validity*). The
   registration loop (`agent.registry`) renews the agent's lease, then reads the
   controller's epoch key and raises the node epoch to it; a cycle that started at
   monotonic time t and did both makes the agent valid until t + lease_ttl - margin.
   A new leader raises the epoch in etcd, then fences every agent registered at that
   moment; an agent it does not find has a lease that expired, so its validity ended
   before the listing, and every later cycle reads the new epoch before it makes the
   agent valid again (docs/agent.md has the whole argument). Outside its validity a
   mutation waits up to `fence_wait` seconds for it, then fails `Unavailable`.

Raising the epoch is always safe, so it needs no validity (the Fence RPC, the epoch
read from etcd, a mutation carrying a newer epoch). Reads are not fenced.

Lock order: the node gate before any extent's gate, never the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from agent import fileio
from agent.gate import Gate
from agent.validation import check_epoch
from volkin.errors import FencedOut, StorageIOError, Unavailable
from volkin.log import event

_log = logging.getLogger("agent.fencing")
NODE_FILE = "node.json"
NODE_FORMAT = 1
Clock = Callable[[], float]


def validity_margin(lease_ttl: float) -> float:
    """How long before its lease could expire in etcd the agent stops admitting mutations.

    The window t + lease_ttl is already conservative: t is taken before the renewal is
    sent, and etcd counts the TTL from when it receives it (and only ever extends a
    lease, on a leader change). The margin covers what that does not: a mutation admitted
    at the end of the window still has to land (one buffered write, one fua write or
    one copy piece: well under 0.5 s on a healthy disk), and clocks of the agent, etcd
    and the controller that tick at slightly different rates or stall (a long GC or
    scheduling pause between the check and the I/O). A tenth of the TTL scales that
    with the operator's own tolerance for silence; half a second is the floor.
    """
    return max(0.5, lease_ttl / 10)


class Validity:
    """Until when the agent can prove that no newer controller took over unseen.

    `proved` extends it after each successful renewal cycle; `valid` is a lock-free
    comparison of two floats (the event loop calls it on every write); `wait` blocks a
    worker thread until valid or a deadline, `wait_async` a coroutine (no thread held).
    """

    def __init__(self, node_id: str, clock: Clock = time.monotonic) -> None:
        self._node_id = node_id
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._valid_until = -math.inf
        self._started = clock()
        self._last_proof: float | None = None
        self._lease_lost_at: float | None = None
        self._closed = False
        self._wakeups: set[asyncio.Future[None]] = set()  # coroutines in wait_async

    def valid(self) -> bool:
        return self._clock() < self._valid_until

    def remaining(self) -> float:
        """Seconds of validity left (0 when the agent refuses mutations)."""
        return max(0.0, self._valid_until - self._clock())

    def proved(self, started: float, lease_ttl: float) -> None:
        """A renewal cycle that started at `started` (monotonic, before the lease was
        renewed or granted) renewed the lease, read the epoch and recorded it."""
        until = started + lease_ttl - validity_margin(lease_ttl)
        with self._cond:
            if self._closed:
                return
            self._last_proof = max(started, self._last_proof or started)
            self._lease_lost_at = None
            self._valid_until = max(self._valid_until, until)
            self._wake_all()

    def lease_lost(self) -> None:
        """The lease expired or was revoked: etcd no longer lists the agent, so a new
        leader would not fence it. Nothing is admitted until a new lease is proved."""
        with self._cond:
            self._valid_until = -math.inf
            self._lease_lost_at = self._clock()

    def close(self) -> None:
        """Shutting down: nothing is admitted any more, and waiters give up at once."""
        with self._cond:
            self._closed = True
            self._valid_until = -math.inf
            self._wake_all()

    def _wake_all(self) -> None:
        """Wakes every waiter, threads and coroutines (any thread may call it)."""
        self._cond.notify_all()
        for future in self._wakeups:
            future.get_loop().call_soon_threadsafe(_resolve, future)
        self._wakeups.clear()

    def wait(self, deadline: float) -> None:
        """Returns once valid; raises Unavailable at `deadline` (monotonic)."""
        with self._cond:
            while True:
                now = self._clock()
                if self._closed:
                    raise Unavailable(f"agent {self._node_id} is shutting down; refusing writes")
                if now < self._valid_until:
                    return
                if now >= deadline:
                    raise Unavailable(self._why(now))
                self._cond.wait(deadline - now)

    async def wait_async(self, deadline: float) -> None:
        """`wait` for a coroutine: holds no worker thread while etcd is out of reach."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                now = self._clock()
                if self._closed:
                    raise Unavailable(f"agent {self._node_id} is shutting down; refusing writes")
                if now < self._valid_until:
                    return
                if now >= deadline:
                    raise Unavailable(self._why(now))
                future: asyncio.Future[None] = loop.create_future()
                self._wakeups.add(future)
            try:
                await asyncio.wait_for(future, deadline - now)
            except TimeoutError:
                pass
            finally:
                with self._cond:
                    self._wakeups.discard(future)

    def _why(self, now: float) -> str:
        cannot = ("so it cannot prove that no newer controller took over; refusing writes "
                  "until it does")
        if self._lease_lost_at is not None:
            return (f"agent {self._node_id} lost its etcd lease {now - self._lease_lost_at:.1f} s "
                    f"ago and has not registered again, {cannot}")
        if self._last_proof is None:
            return (f"agent {self._node_id} has not reached etcd since it started "
                    f"{now - self._started:.1f} s ago, {cannot}")
        return (f"agent {self._node_id} has not reached etcd for {now - self._last_proof:.1f} s, "
                f"{cannot}")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class NodeFence:
    """The node's epoch, its gate and its validity. Thread-safe."""

    def __init__(self, data_dir: Path, node_id: str, fence_wait: float,
                 initial_epoch: Callable[[], int], clock: Clock = time.monotonic) -> None:
        """Loads the node epoch from DATA_DIR/node.json; without that file (a data
        directory from before node-wide fencing, or a new one), starts from
        `initial_epoch()` — the highest epoch the extent metas recorded — and writes
        the file before anything else can happen."""
        self._path = data_dir / NODE_FILE
        self._node_id = node_id
        self._fence_wait = fence_wait
        self._clock = clock
        self._gate = Gate()
        self.validity = Validity(node_id, clock)
        self._epoch = self._load(initial_epoch)

    # -- the node file -----------------------------------------------------------------

    def _load(self, initial_epoch: Callable[[], int]) -> int:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            epoch = initial_epoch()
            self._record(epoch)
            event(_log, "agent.node_epoch_initialised", node=self._node_id, epoch=epoch,
                  file=self._path)
            return epoch
        except OSError as exc:
            raise StorageIOError(f"reading {self._path}: {exc.strerror or exc}") from exc
        try:
            record = json.loads(raw)
            if record.get("format") != NODE_FORMAT:
                raise ValueError(f"format {record.get('format')!r}, expected {NODE_FORMAT}")
            return int(record["epoch"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageIOError(f"{self._path} is not a node file this agent understands: "
                                 f"{exc}") from exc

    def _record(self, epoch: int) -> None:
        data = json.dumps({"format": NODE_FORMAT, "epoch": epoch}, sort_keys=True).encode()
        with fileio.storage_errors(f"recording the node's fencing epoch {epoch}"):
            fileio.write_file_durably(self._path, data)

    # -- the epoch ---------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The node's highest epoch. It only grows, so a value read without the gate
        can only be too low: refusing an epoch lower than it is always right."""
        return self._epoch

    def _fenced(self, epoch: int) -> FencedOut:
        return FencedOut(f"agent {self._node_id}: epoch {epoch} is older than epoch "
                         f"{self._epoch} already seen; a newer controller took over")

    def refuse_older(self, epoch: int) -> None:
        """InvalidArgument for epoch 0, FencedOut for an epoch older than the node's."""
        check_epoch(epoch)
        if epoch < self._epoch:
            raise self._fenced(epoch)

    def raise_to(self, epoch: int, by: str) -> int:
        """Makes `epoch` the node's epoch if it is higher (durably, after every mutation
        in flight has finished); returns the node's epoch. Blocks: call it in a thread."""
        with self._gate.exclusive():
            old = self._epoch
            if epoch > old:
                self._record(epoch)
                self._epoch = epoch
                event(_log, "agent.epoch_raised", node=self._node_id, epoch=epoch, previous=old,
                      by=by)
            return self._epoch

    def fence(self, epoch: int) -> int:
        """The Fence RPC: raise to `epoch`; equal is a no-op; lower is FencedOut."""
        self.refuse_older(epoch)
        if epoch == self._epoch:
            # The raise that recorded it already waited for everything older.
            return epoch
        return self.raise_to(epoch, by="fence")

    # -- admitting mutations -------------------------------------------------------------

    @contextlib.contextmanager
    def admitted(self, epoch: int) -> Iterator[None]:
        """Holds the node gate shared for one mutation at `epoch`: first records a newer
        epoch, then waits (up to fence_wait) for validity. Blocks: call it in a thread,
        and never while holding the gate or an extent's gate."""
        deadline = self._clock() + self._fence_wait
        while True:
            self.refuse_older(epoch)
            if epoch > self._epoch:
                self.raise_to(epoch, by="mutation")
                continue
            # Wait without the gate: a renewal cycle may need it exclusive to record
            # the epoch it read, and only then can it prove validity.
            self.validity.wait(deadline)
            with self._gate.shared():
                if epoch < self._epoch:
                    raise self._fenced(epoch)
                if epoch == self._epoch and self.validity.valid():
                    yield
                    return
            # A newer epoch arrived, or validity lapsed, while we waited for the gate.

    async def ready(self, epoch: int) -> None:
        """Waits on the event loop, holding no worker thread, while the agent cannot
        prove its validity (up to fence_wait; an older epoch is refused at once rather
        than after the wait). Call it before handing a mutation to a thread, where the
        store validates the request and `admitted` checks everything again."""
        if self.validity.valid():
            return
        self.refuse_older(epoch)
        await self.validity.wait_async(self._clock() + self._fence_wait)

    def try_admit(self, epoch: int) -> bool:
        """`admitted` without waiting: True means the caller now holds the gate shared
        and must call `release`; False means go to a worker thread and use `admitted`.
        Raises FencedOut (or InvalidArgument) at once, like `admitted`."""
        self.refuse_older(epoch)
        if epoch != self._epoch or not self.validity.valid():
            return False
        if not self._gate.try_acquire_shared():
            return False
        if epoch != self._epoch:  # raised between the check and the gate
            self._gate.release_shared()
            self.refuse_older(epoch)
            return False
        return True

    def release(self) -> None:
        self._gate.release_shared()

    def close(self) -> None:
        """Admits nothing more (waiters fail at once) and returns once every admitted
        mutation has finished. Blocks: call it in a thread."""
        self.validity.close()
        with self._gate.exclusive():
            pass
