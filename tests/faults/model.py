"""The fault suite's reference model and checker: which write each 4 KiB cell may hold.

Every write the suite issues gets a unique id, and its bytes say so: a cell of
4 KiB written by write `w` is 256 records of 16 bytes (magic, cell index, `w`),
so whatever a volume returns, the checker can tell which write a cell holds (or
that it holds bytes of no write, or of a write meant for another cell).

Per cell the model keeps the set of writes the cell may hold:

- a new volume: {ZERO}, the zeros of a thin volume;
- a write acknowledged to the client: exactly {w};
- a write whose outcome is unknown (an error reply, a lost connection, a
  connection given up): the set grows by w, old or new;
- a snapshot S of V, or a refresh of T from S, taken while every writer is
  quiescent with nothing outstanding: the sets are copied (S := V, T := S);
- a write that must never land (queued on a deposed controller): registered so
  that reports can name it, never added to any set.

`check` compares what a volume returns with the sets, byte by byte: a cell may
also be a mix of the writes its set allows (a write that failed half-way), but
nothing else. A second check, `deposed_acks`, finds acknowledgements that a
controller sent after a newer leader had started serving.

No I/O here: the trial feeds the model from its writers, and the unit tests
(test_model.py) feed it by hand to prove that the checker can fail.
"""

from __future__ import annotations

import statistics
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

CELL = 4096
_RECORD = struct.Struct("<4sIQ")  # magic, cell index, write id
_MAGIC = b"VKft"
_PER_CELL = CELL // _RECORD.size
ZERO = 0  # the "write" a never-written cell holds: zeros

# Write states.
PENDING = "pending"
ACKNOWLEDGED = "acknowledged"
UNKNOWN = "unknown"
NEVER = "never"  # must never land and never be acknowledged


def cell_bytes(write_id: int, cell: int) -> bytes:
    """The 4 KiB that write `write_id` puts in cell `cell` (zeros for ZERO)."""
    if write_id == ZERO:
        return bytes(CELL)
    return _RECORD.pack(_MAGIC, cell, write_id) * _PER_CELL


def records(data: bytes) -> list[tuple[int, int] | None]:
    """(cell, write id) of each 16-byte record of a cell; (-1, ZERO) for zeros, None for
    bytes of no write."""
    found: list[tuple[int, int] | None] = []
    for pos in range(0, len(data) - _RECORD.size + 1, _RECORD.size):
        chunk = data[pos:pos + _RECORD.size]
        if chunk == bytes(_RECORD.size):
            found.append((-1, ZERO))
            continue
        magic, cell, write_id = _RECORD.unpack(chunk)
        found.append((cell, write_id) if magic == _MAGIC else None)
    return found


@dataclass
class WriteRecord:
    """One cell of one write, from issue to outcome."""

    id: int
    volume: str
    cell: int
    by: str  # "fill", a writer's name, or "queued"
    issued: float  # wall clock
    request: int = 0  # the NBD request it was part of (its first write id), 0: its own
    state: str = PENDING
    resolved: float = 0.0
    error: str = ""
    # The connection it went over: the controller's NBD address and pid.
    controller: str = ""
    pid: int = 0
    connected: float = 0.0  # when that connection was made
    # The last moment the client had polled its connection and the write was still
    # unacknowledged: the acknowledgement was sent after it.
    pending_seen: float = 0.0
    # When the client, having given the write up as unknown, still saw it acknowledged.
    late_ack: float = 0.0


@dataclass(frozen=True)
class Violation:
    """Something the model does not allow, with everything needed to understand it."""

    # "wrong data", "lost acknowledged write", "deposed ack", "write that must never land"
    what: str
    volume: str
    offset: int
    read: str
    allowed: str
    cells: int = 1  # consecutive cells with the same kind of violation, from `offset`

    def describe(self) -> str:
        if self.offset < 0:
            return f"{self.what} on {self.volume}: {self.read}; {self.allowed}"
        where = f"{self.volume} offset {self.offset} (cell {self.offset // CELL})"
        if self.cells > 1:
            where += (f" and the {self.cells - 1} cells after it (up to offset "
                      f"{self.offset + self.cells * CELL}; the first cell:)")
        if self.what == "deposed ack":
            return f"{self.what}: {where}: {self.read}; {self.allowed}"
        return f"{self.what}: {where} reads {self.read}; the model allows {self.allowed}"


@dataclass(frozen=True)
class ServingRecord:
    """A controller started serving as the leader (from its log)."""

    at: float
    nbd: str
    pid: int
    epoch: int


@dataclass
class Model:
    """Allowed writes per cell of each volume; safe to feed from several threads."""

    start: float = field(default_factory=time.time)
    cells: dict[str, list[set[int]]] = field(default_factory=dict)
    writes: dict[int, WriteRecord] = field(default_factory=dict)
    _next: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- volumes and topology ----------------------------------------------------------
    def create(self, volume: str, size: int) -> None:
        """A new thin volume: zeros everywhere."""
        with self._lock:
            self.cells[volume] = [{ZERO} for _ in range(size // CELL)]

    def copy(self, target: str, source: str) -> None:
        """Snapshot `target` of `source`, or refresh `target` from `source`, taken while
        nothing is outstanding: `target` may hold what `source` may hold."""
        with self._lock:
            self.cells[target] = [set(allowed) for allowed in self.cells[source]]

    # -- writes ------------------------------------------------------------------------
    def issue(self, volume: str, cell: int, by: str, *, never: bool = False,
              at: float | None = None) -> WriteRecord:
        """A new write of one cell (pending until `acknowledged` or `unknown`); `never`
        marks one that must never land nor be acknowledged."""
        with self._lock:
            record = WriteRecord(self._next, volume, cell, by, at or time.time(),
                                 state=NEVER if never else PENDING)
            self._next += 1
            self.writes[record.id] = record
            return record

    def acknowledged(self, record: WriteRecord, at: float | None = None) -> None:
        """The client got a success reply: the cell holds this write and nothing older."""
        with self._lock:
            record.resolved = at or time.time()
            if record.state == NEVER:
                record.error = "acknowledged"  # `never_acknowledged` reports it
                return
            record.state = ACKNOWLEDGED
            self.cells[record.volume][record.cell] = {record.id}

    def unknown(self, record: WriteRecord, why: str, at: float | None = None) -> None:
        """The outcome is unknown: the cell may hold this write or what it held before."""
        with self._lock:
            record.resolved = at or time.time()
            record.error = why
            if record.state == NEVER:
                return
            record.state = UNKNOWN
            self.cells[record.volume][record.cell].add(record.id)

    def allowed(self, volume: str, cell: int) -> set[int]:
        with self._lock:
            return set(self.cells[volume][cell])

    # -- checks ------------------------------------------------------------------------
    def check(self, volume: str, data: bytes) -> list[Violation]:
        """Every cell of `data` (the whole volume as read) against the allowed sets."""
        with self._lock:
            allowed_sets = [set(s) for s in self.cells[volume]]
        if len(data) != len(allowed_sets) * CELL:
            return [Violation("wrong size", volume, -1, f"read {len(data)} bytes",
                              f"expected {len(allowed_sets) * CELL}")]
        found: list[Violation] = []
        for cell, allowed in enumerate(allowed_sets):
            got = data[cell * CELL:(cell + 1) * CELL]
            candidates = [cell_bytes(w, cell) for w in sorted(allowed)]
            if any(got == c for c in candidates):
                continue
            bad = _first_disallowed_byte(got, candidates)
            if bad is None:
                continue  # a mix of allowed writes: a write that failed half-way
            violation = self._violation(volume, cell, got, allowed, bad)
            last = found[-1] if found else None
            if (last is not None and last.what == violation.what
                    and last.offset + last.cells * CELL == violation.offset):
                found[-1] = replace(last, cells=last.cells + 1)  # one report per run
            else:
                found.append(violation)
        return found

    def _violation(self, volume: str, cell: int, got: bytes, allowed: set[int],
                   bad: int) -> Violation:
        held = list(dict.fromkeys(records(got)))
        ids = [r[1] for r in held if r is not None]
        only = next(iter(allowed)) if len(allowed) == 1 else ZERO
        if any(w in self.writes and self.writes[w].state == NEVER for w in ids):
            what = "write that must never land"
        elif (only != ZERO and self.writes[only].state == ACKNOWLEDGED and ids
              and all(w < only for w in ids)):
            what = "lost acknowledged write"
        else:
            what = "wrong data"
        parts = []
        for r in held:
            if r is None:
                parts.append("bytes of no write")
            elif r[1] == ZERO:
                parts.append("zeros")
            else:
                name = self.describe(r[1])
                parts.append(name if r[0] == cell else f"{name} [its record says cell {r[0]}]")
        read = " + ".join(parts) + f" (first disallowed byte at +{bad}: 0x{got[bad]:02x})"
        return Violation(what, volume, cell * CELL, read,
                         " or ".join(self.describe(w) for w in sorted(allowed)))

    def describe(self, write_id: int) -> str:
        """`#17 (w2 to V1 cell 5 via c1 pid 123, acknowledged at +3.21s)`."""
        if write_id == ZERO:
            return "zeros (never written)"
        record = self.writes.get(write_id)
        if record is None:
            return f"#{write_id} (a write this trial never issued)"
        via = f" via {record.controller} pid {record.pid}" if record.controller else ""
        if record.state == ACKNOWLEDGED:
            outcome = f"acknowledged at +{record.resolved - self.start:.2f}s"
        elif record.state == UNKNOWN:
            outcome = f"outcome unknown at +{record.resolved - self.start:.2f}s: {record.error}"
        elif record.state == NEVER:
            outcome = (f"queued at +{record.issued - self.start:.2f}s on a deposed controller, "
                       "must never land")
        else:
            outcome = "still pending"
        if record.late_ack:
            outcome += f"; then acknowledged late at +{record.late_ack - self.start:.2f}s"
        return f"#{record.id} ({record.by} to {record.volume} cell {record.cell}{via}, {outcome})"

    def never_acknowledged(self) -> list[Violation]:
        """Writes that must never be acknowledged and were (one report per request)."""
        with self._lock:
            acked = [r for r in self.writes.values()
                     if r.state == NEVER and r.error == "acknowledged"]
        requests: dict[int, list[WriteRecord]] = {}
        for record in acked:
            requests.setdefault(record.request or record.id, []).append(record)
        found = []
        for records_ in requests.values():
            first = min(records_, key=lambda r: r.cell)
            cells = f", {len(records_)} cells from here" if len(records_) > 1 else ""
            found.append(Violation(
                "deposed ack", first.volume, first.cell * CELL,
                f"{self.describe(first.id)}{cells} was acknowledged at "
                f"+{first.resolved - self.start:.2f}s",
                "a deposed controller must acknowledge nothing"))
        return found

    def deposed_acks(self, servings: Sequence[ServingRecord],
                     slack: float = 0.05) -> list[Violation]:
        """Acknowledgements sent by a controller after a newer leader had started serving.

        The epoch of a connection is the latest serving of that (pid, NBD address) at or
        before the connection was made. An acknowledgement was sent after the moment
        the client last saw the write still pending (`pending_seen`); if a leader with a
        higher epoch was serving before that moment (minus `slack`, for clocks read in
        different processes), the acknowledgement came from a deposed controller.
        """
        with self._lock:
            acked = [r for r in self.writes.values() if r.controller and (
                r.state == ACKNOWLEDGED or r.late_ack)]
        requests: dict[int, list[WriteRecord]] = {}
        for record in acked:  # one report per NBD request, not per cell
            requests.setdefault(record.request or record.id, []).append(record)
        found = []
        for records_ in requests.values():
            first = min(records_, key=lambda r: r.cell)
            epoch = _epoch_of(servings, first)
            seen = max(r.pending_seen for r in records_)
            newer = [s for s in servings if s.epoch > epoch and s.at < seen - slack]
            if not epoch or not newer:
                continue
            cells = f"{len(records_)} cells from here" if len(records_) > 1 else "one cell"
            found.append(Violation(
                "deposed ack", first.volume, first.cell * CELL,
                f"{self.describe(first.id)} ({cells}) was still unacknowledged at "
                f"+{seen - self.start:.2f}s, when epoch {newer[0].epoch} (pid {newer[0].pid}) "
                f"had served since +{newer[0].at - self.start:.2f}s",
                f"a controller of epoch {epoch} must acknowledge nothing after that"))
        return found


def _epoch_of(servings: Sequence[ServingRecord], record: WriteRecord) -> int:
    mine = [s for s in servings if s.pid == record.pid and s.nbd == record.controller
            and s.at <= record.connected + 1.0]
    return max(mine, key=lambda s: s.at).epoch if mine else 0


def _first_disallowed_byte(got: bytes, candidates: Sequence[bytes]) -> int | None:
    """The first offset whose byte no candidate has there, or None if every byte is some
    candidate's."""
    for offset, byte in enumerate(got):
        if all(c[offset] != byte for c in candidates):
            return offset
    return None


# -- unavailability ----------------------------------------------------------------------
def longest_gap(acks: Iterable[float], since: float, until: float,
                excluded: Sequence[tuple[float, float]] = ()) -> float:
    """The longest time in [since, until] without an acknowledgement, not counting the
    `excluded` intervals (when the trial itself held the writers)."""
    points = [since, *sorted(t for t in acks if since < t <= until)]
    ends = [*points[1:], until]
    return max((_length(a, b, excluded) for a, b in zip(points, ends, strict=True)),
               default=0.0)


def _length(a: float, b: float, excluded: Sequence[tuple[float, float]]) -> float:
    overlap = sum(max(0.0, min(b, e) - max(a, s)) for s, e in excluded)
    return max(0.0, b - a - overlap)


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median and max of a fault kind's unavailability samples, in seconds."""
    if not samples:
        return {"median": 0.0, "max": 0.0}
    return {"median": round(statistics.median(samples), 2), "max": round(max(samples), 2)}
