"""What a scrape reads of the active term: volumes' map figures, jobs, leadership.

prometheus_client calls `TermState.collect` in its HTTP thread, but the term
belongs to the event loop, and its objects are not safe to read from another
thread while the loop changes them (a map's dict of segments may change size
under a count). So a scrape asks the loop for a `Snapshot` of plain values
(`asyncio.run_coroutine_threadsafe`), computed there between two steps, and
waits for it at most SNAPSHOT_TIMEOUT seconds; a loop too busy to answer in
time gets a scrape of the event counters alone (and a log line). The figures
are counts of bits the controller holds in memory: a scrape costs no etcd read.

Allocated bytes are the one figure that needs the agents (a StatExtent of every
extent), too slow to ask at every scrape: each volume's is cached with the time
it was learnt, refreshed in the loop when older than ALLOCATED_MAX_AGE, and a
scrape waits at most ALLOCATED_WAIT for a refresh it started; after that it
reports what it has, with its age (`..._allocated_age_seconds`), and the refresh
goes on for the next scrape.

A job's bytes per second are measured between scrapes (`Throughput`): over the
last minute, from the newest scrape at least a minute old (or the oldest one
there is) to this one. The first scrape of a job, or one less than a second
after the oldest, reports no rate and no ETA yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.agents import CALL_BUDGET
from controller.core import Core
from controller.jobs import JobState
from controller.nbd.server import NbdServer
from controller.term import Term
from volkin.errors import VolkinError
from volkin.log import event

_log = logging.getLogger("controller.metrics")
SNAPSHOT_TIMEOUT = 5.0
ALLOCATED_MAX_AGE = 15.0
ALLOCATED_WAIT = 2.0
# Volumes whose allocated bytes are asked at once, and how long an agent call of
# that may retry (an agent that is away must not hold the refresh for io_wait).
ALLOCATED_PARALLEL = 8
ALLOCATED_CALL_BUDGET = 5.0
# Jobs that ended have nothing left to watch: counted by state, not shown one by one.
ENDED = (JobState.DONE, JobState.CANCELLED)


@dataclass(frozen=True)
class VolumeFigures:
    name: str
    kind: str
    source: str  # the volume it still reads through, "" if none
    size_bytes: int
    blocks: int
    valid: int  # V bits set: blocks its own memory holds for it
    modified: int  # blocks written since its last reference point (its newest interval)
    to_copy: int  # blocks it still reads through `source`
    connections: int
    allocated: tuple[int, float] | None  # (bytes, age in seconds), once learnt


@dataclass(frozen=True)
class JobFigures:
    id: str
    kind: str
    target: str
    source: str
    state: str
    blocks: int
    blocks_done: int
    copied_bytes: int
    remaining_bytes: int
    rate_limit: int
    bytes_per_second: float | None


@dataclass(frozen=True)
class Snapshot:
    leader: bool
    epoch: int
    lease_remaining: float
    volumes: tuple[VolumeFigures, ...] = ()
    jobs: tuple[JobFigures, ...] = ()
    job_states: Mapping[str, int] = field(default_factory=dict)


class Throughput:
    """Bytes per second of each job, from the bytes it had copied at successive scrapes."""

    WINDOW = 60.0
    MIN_SPAN = 1.0

    def __init__(self) -> None:
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def sample(self, job: str, now: float, copied: int) -> float | None:
        samples = self._samples.setdefault(job, deque())
        if samples and copied < samples[-1][1]:
            samples.clear()  # counted afresh (a new term, a resumed job): start over
        samples.append((now, copied))
        # Keep the newest sample at least WINDOW old, drop those before it.
        while len(samples) > 2 and samples[1][0] <= now - self.WINDOW:
            samples.popleft()
        first_at, first_copied = samples[0]
        if now - first_at < self.MIN_SPAN:
            return None
        return (copied - first_copied) / (now - first_at)

    def stopped(self, job: str) -> None:
        """A job that does not copy (paused, failed): its next run is measured afresh."""
        self._samples.pop(job, None)

    def keep(self, jobs: Iterable[str]) -> None:
        kept = set(jobs)
        for job in [j for j in self._samples if j not in kept]:
            del self._samples[job]


class AllocatedBytes:
    """What each volume's memory holds on its agents' disks, as last asked."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[str, int, float]] = {}  # name -> (memory, bytes, when)
        self._refreshing: asyncio.Task[None] | None = None

    def reset(self) -> None:
        """A term ended: what it learnt may be stale, and its refresh must stop."""
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = None
        self._known.clear()

    def get(self, name: str, memory: str, now: float) -> tuple[int, float] | None:
        known = self._known.get(name)
        if known is None or known[0] != memory:
            return None
        return known[1], now - known[2]

    async def refresh(self, core: Core, memories: Mapping[str, str], now: float,
                      wait: float) -> None:
        """Starts a refresh of the stale volumes (unless one runs) and waits up to `wait`."""
        for name in [n for n in self._known if n not in memories]:
            del self._known[name]
        stale = [name for name, memory in memories.items()
                 if (known := self._known.get(name)) is None or known[0] != memory
                 or now - known[2] >= ALLOCATED_MAX_AGE]
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self._ask(core, stale),
                                                   name="allocated-bytes")
        if self._refreshing is not None and not self._refreshing.done():
            await asyncio.wait({self._refreshing}, timeout=wait)

    async def _ask(self, core: Core, names: list[str]) -> None:
        CALL_BUDGET.set(ALLOCATED_CALL_BUDGET)
        parallel = asyncio.Semaphore(ALLOCATED_PARALLEL)

        async def one(name: str) -> None:
            async with parallel:
                try:
                    memory = core.engine.volume(name).memory
                    found = await core.allocated_bytes(name)
                except (VolkinError, TimeoutError):
                    return  # deleted meanwhile, or an agent away: the old value stays
                self._known[name] = (memory, found, time.monotonic())

        results = await asyncio.gather(*(one(name) for name in names), return_exceptions=True)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:  # not an agent away (the old values stay): say so, once per refresh
            event(_log, "metrics.allocated_failed", logging.WARNING, volumes=len(failed),
                  error=repr(failed[0]))


class TermState(Collector):
    """The prometheus_client collector of what the active term holds (see the module)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nbd: NbdServer | None = None) -> None:
        self._loop = loop
        self._nbd = nbd
        self._term: Term | None = None
        self._epoch = 0  # of the current or last term
        self._throughput = Throughput()
        self._allocated = AllocatedBytes()

    def attach(self, term: Term) -> None:
        """Reports `term` from now on (call it in the loop)."""
        self._term, self._epoch = term, term.epoch
        self._allocated.reset()

    def detach(self) -> None:
        self._term = None
        self._allocated.reset()

    def describe(self) -> list[Metric]:
        return []  # the families depend on the volumes: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        try:
            future = asyncio.run_coroutine_threadsafe(self.snapshot(), self._loop)
        except RuntimeError:  # the loop is closed: the process is stopping
            return
        try:
            snapshot = future.result(SNAPSHOT_TIMEOUT)
        except FutureTimeout:
            future.cancel()
            event(_log, "metrics.snapshot_late", logging.WARNING,
                  error=f"the event loop did not answer within {SNAPSHOT_TIMEOUT:g} s; this "
                        f"scrape has the event counters only")
            return
        yield from families(snapshot)

    async def snapshot(self) -> Snapshot:
        """The figures of the term as they are now (run in the loop)."""
        term = self._term
        if term is not None:
            core = term.core
            memories = {name: volume.memory for name, volume in core.engine.graph.volumes.items()
                        if name not in core.hidden}
            await self._allocated.refresh(core, memories, time.monotonic(), ALLOCATED_WAIT)
        term = self._term  # the term may have ended meanwhile; nothing awaits from here on
        if term is None or term.fence.deposed:
            return Snapshot(False, self._epoch, 0.0)
        now = time.monotonic()
        jobs, job_states = self._jobs(term, now)
        return Snapshot(True, term.epoch, max(0.0, term.fence.remaining()),
                        tuple(self._volumes(term.core, now)), jobs, job_states)

    def _volumes(self, core: Core, now: float) -> Iterator[VolumeFigures]:
        graph = core.engine.graph
        for name in sorted(graph.volumes):
            if name in core.hidden:
                continue
            volume = graph.volumes[name]
            info = core.engine.info(name)
            modified = (graph.maps[volume.intervals[-1].modified].count()
                        if volume.intervals else 0)
            yield VolumeFigures(
                name, info.kind.value, info.source or "", info.size_blocks * info.block_size,
                info.size_blocks, info.valid_blocks, modified,
                info.size_blocks - info.valid_blocks if info.source is not None else 0,
                self._nbd.connections(name) if self._nbd is not None else 0,
                self._allocated.get(name, volume.memory, now))

    def _jobs(self, term: Term, now: float) -> tuple[tuple[JobFigures, ...], dict[str, int]]:
        jobs = term.jobs
        states = {state.value: 0 for state in JobState}
        shown: list[JobFigures] = []
        for record in jobs.list():
            if record.state in ENDED:
                states[record.state.value] += 1
                continue
            status = jobs.status(record)
            states[status.state.value] += 1
            if status.state in (JobState.RUNNING, JobState.WAITING):
                rate = self._throughput.sample(record.id, now, status.bytes_copied)
            else:
                self._throughput.stopped(record.id)
                rate = 0.0
            left = max(0, record.blocks_total - status.blocks_done)
            shown.append(JobFigures(record.id, record.kind, record.target, record.source,
                                    status.state.value, record.blocks_total, status.blocks_done,
                                    status.bytes_copied,
                                    left * _block_size(term.core, record.target), record.rate,
                                    rate))
        self._throughput.keep(job.id for job in shown)
        return tuple(shown), states


def _block_size(core: Core, name: str) -> int:
    try:
        return core.engine.volume(name).block_size
    except VolkinError:
        return 0


def families(snapshot: Snapshot) -> list[Metric]:
    """The state families of one snapshot, in Prometheus' terms."""
    out: list[Metric] = []

    def gauge(name: str, help_text: str, labels: list[str],
              samples: Iterable[tuple[list[str], float]]) -> None:
        family = GaugeMetricFamily(f"volkin_controller_{name}", help_text, labels=labels)
        for values, value in samples:
            family.add_metric(values, value)
        out.append(family)

    gauge("leader", "1 while this controller is the active one (it serves), else 0", [],
          [([], 1.0 if snapshot.leader else 0.0)])
    gauge("fencing_epoch", "Fencing epoch of this controller's current (or last) term", [],
          [([], snapshot.epoch)])
    gauge("lease_remaining_seconds", "Seconds this controller can still prove its lease; 0 "
          "while it does not lead", [], [([], snapshot.lease_remaining)])

    volumes = snapshot.volumes
    v = ["volume"]
    gauge("volume_info", "1 for every volume served; its kind and the volume it still reads "
          "through", ["volume", "kind", "source"],
          [([x.name, x.kind, x.source], 1.0) for x in volumes])
    gauge("volume_size_bytes", "Size of the volume", v, [([x.name], x.size_bytes) for x in volumes])
    gauge("volume_blocks", "Blocks of the volume", v, [([x.name], x.blocks) for x in volumes])
    gauge("volume_blocks_valid", "Blocks the volume's own memory holds for it (V bits set)", v,
          [([x.name], x.valid) for x in volumes])
    gauge("volume_blocks_modified", "Blocks written since the volume's last reference point "
          "(its creation, a snapshot of it, a refresh of or from it)", v,
          [([x.name], x.modified) for x in volumes])
    gauge("volume_blocks_to_copy", "Blocks the volume still reads through another one: what "
          "a refresh or materialize has left to copy", v,
          [([x.name], x.to_copy) for x in volumes])
    gauge("volume_allocated_bytes", "Bytes the volume's extents hold on the agents' disks, as "
          "last asked (see volume_allocated_age_seconds)", v,
          [([x.name], x.allocated[0]) for x in volumes if x.allocated is not None])
    gauge("volume_allocated_age_seconds", "Age of volume_allocated_bytes", v,
          [([x.name], x.allocated[1]) for x in volumes if x.allocated is not None])
    gauge("nbd_connections", "Open NBD connections to the volume", v,
          [([x.name], x.connections) for x in volumes])

    jobs = snapshot.jobs
    j = ["job", "kind", "target", "source"]

    def ids(x: JobFigures) -> list[str]:
        return [x.id, x.kind, x.target, x.source]

    gauge("jobs", "Background jobs by state (ended ones included)", ["state"],
          [([state], count) for state, count in sorted(snapshot.job_states.items())])
    gauge("job_state", "1 for the job's current state, 0 for the others (jobs not ended)",
          [*j, "state"], [([*ids(x), state.value], 1.0 if state.value == x.state else 0.0)
                          for x in jobs for state in JobState])
    gauge("job_blocks", "Blocks the job copies in all", j, [(ids(x), x.blocks) for x in jobs])
    gauge("job_blocks_done", "Blocks the job has copied", j,
          [(ids(x), x.blocks_done) for x in jobs])
    gauge("job_progress_ratio", "Blocks done over blocks in all (1 when there was nothing to "
          "copy)", j, [(ids(x), x.blocks_done / x.blocks if x.blocks else 1.0) for x in jobs])
    gauge("job_copied_bytes", "Bytes of the blocks the job has copied", j,
          [(ids(x), x.copied_bytes) for x in jobs])
    gauge("job_rate_limit_bytes_per_second", "The job's copy limit (0: unlimited)", j,
          [(ids(x), x.rate_limit) for x in jobs])
    gauge("job_bytes_per_second", "Bytes the job copied per second over the last minute of "
          "scrapes (0 while paused or failed)", j,
          [(ids(x), x.bytes_per_second) for x in jobs if x.bytes_per_second is not None])
    gauge("job_eta_seconds", "Seconds until the job is done at job_bytes_per_second (absent "
          "while that is unknown or 0)", j,
          [(ids(x), x.remaining_bytes / x.bytes_per_second) for x in jobs
           if x.bytes_per_second])
    return out
