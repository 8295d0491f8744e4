"""Background copy jobs: the copy that turns a refresh target (or a snapshot) real.

A job walks the blocks its target still reads through another volume, one plan
per block under that block's lock, at an optional rate limit, and detaches the
target when none is left. Its progress is not stored anywhere: the maps are the
checkpoint (the blocks left are the target's invalid blocks), so a job resumed
after a pause, a failure or a controller restart simply continues with what is
left, and its progress (`blocks_done`, `bytes_copied`) is computed from the maps.
What is stored, under `Keys.job(id)`, is what the maps cannot say: the job's
kind, target, source, rate, whether it is paused, and how it ended.

Faults: a block whose agent or etcd cannot be reached is retried with backoff
(exponential, with jitter) and the job shows `waiting` with the reason in one
line and how long it has waited; it goes on by itself when the part returns.
Only after `fail_after` seconds of waiting does it fail; `resume` takes a failed
job too. `waiting` is not stored: a job that waits is still `running` in etcd,
which is what the next controller must resume. A controller that is deposed
stops its jobs without writing anything: the next one resumes them.

Cancel: the job stops for good (`cancelled`) once no block copy and no detach of
its target is in flight (it holds the target's family lock to be sure), and the
target is left exactly as the maps say: the blocks copied are its own, the rest
still read through the source, so it keeps reading as the PIT copy it became
when the job started, and the source stays as long as it does. Nothing is undone
and nothing is lost; `resume` (or a new refresh or materialize) continues it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum

from controller.agents import CALL_BUDGET
from controller.copywork import CopyWork, Item
from controller.core import Core
from controller.executor import BACKGROUND, RunResult
from controller.fence import Deposed
from controller.guarded import GuardedEtcd
from controller.mapstore import LayoutError
from controller.yielding import Yield
from volkin.engine import RefreshStarted
from volkin.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageFull,
    Unavailable,
    VolkinError,
)
from volkin.keys import Keys
from volkin.log import event

_log = logging.getLogger("controller.jobs")
JOB_FORMAT = 1
# Blocks of one job copied at the same time.
JOB_WORKERS = 512
# While a client did I/O in the last FOREGROUND_WINDOW seconds, all jobs together keep
# at most BUSY_BLOCKS blocks in flight, and start at most `busy_copy_blocks` a second
# (`controller.yielding`).
FOREGROUND_WINDOW = 0.05
BUSY_BLOCKS = 2
# Seconds one agent call of a job may retry before the job reports `waiting`.
JOB_CALL_BUDGET = 3.0
# Seconds one block's copy may take (agent calls and the map commit) before the job
# reports `waiting`; the copy stops where it was, as after a crash, and is retried.
JOB_STEP_TIMEOUT = 15.0
# Done and cancelled jobs kept for `volkin job list` (the controller's `job_history`); the
# oldest beyond are deleted from etcd, at most FORGET_PER_TXN in one transaction.
DEFAULT_HISTORY = 1000
FORGET_PER_TXN = 100
# The error of a refresh's job that a newer refresh of its target cancelled.
SUPERSEDED = "superseded by refresh"


def backoff(failures: int) -> float:
    """Seconds between retries of a waiting job: 0.2 s doubling up to 10 s, plus jitter so
    that the workers of many jobs do not retry in step."""
    return min(10.0, 0.2 * 2.0 ** max(0, failures - 1)) + random.uniform(0, 0.2)


class JobState(Enum):
    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"  # shown, never stored: running, retrying an unreachable part
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # stopped by `cancel`: nothing failed, the copy is left as it was


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str  # "refresh" or "materialize"
    target: str
    source: str
    blocks_total: int
    rate: int = 0  # bytes per second, 0: unlimited
    state: JobState = JobState.RUNNING
    error: str = ""

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "state": self.state.value,
                           "format": JOB_FORMAT}).encode()

    @staticmethod
    def from_json(raw: bytes) -> JobRecord:
        record = json.loads(raw)
        if int(record.get("format", JOB_FORMAT)) != JOB_FORMAT:  # absent: written before 1
            raise LayoutError(f"job record {record.get('id')} has format {record['format']}; "
                              f"this controller reads format {JOB_FORMAT}")
        known = {f.name for f in fields(JobRecord)}
        record = {k: v for k, v in record.items() if k in known}
        record["state"] = JobState(record["state"])
        return JobRecord(**record)


@dataclass(frozen=True)
class JobStatus:
    """A job as reported: its record, and what only the running controller knows."""

    record: JobRecord
    state: JobState
    blocks_done: int
    bytes_copied: int
    reason: str = ""  # why it waits
    waiting_seconds: float = 0.0


class _Waiting:
    """Why a job's blocks cannot be copied right now, since when."""

    def __init__(self) -> None:
        self.reason = ""
        self.since = 0.0
        self.failures = 0

    def failed(self, reason: str) -> None:
        if not self.reason:
            self.since = time.monotonic()
        self.reason = reason
        self.failures += 1

    def succeeded(self) -> None:
        self.reason, self.since, self.failures = "", 0.0, 0

    def seconds(self) -> float:
        return time.monotonic() - self.since if self.reason else 0.0


class _Throttle:
    """Never ahead of `rate` bytes per second of *running* time, and never behind it
    either: each copy takes the next free slot in time, `amount / rate` seconds after
    the one before, and a slot is never earlier than now, so idle time — a pause, a
    wait for an agent — earns no credit to burst with later.

    A worker that waited through a pause holding a block it had taken a slot for
    before the pause takes a new slot when the job resumes (`resumed`): slots that
    passed during the pause are spent, not saved up. A new rate (`volkin job
    set-rate`) starts a new schedule at once: sleepers look again every RECHECK
    seconds and take a slot of the new one."""

    RECHECK = 0.5

    def __init__(self, rate_of: Callable[[], int] | None = None) -> None:
        # Where sleepers look for the job's current rate: every block may already be
        # in a worker's hands, waiting for its slot, when the rate changes.
        self._rate_of = rate_of
        self._rate = 0
        self._next = 0.0  # monotonic time of the next free slot
        self._amount = 0
        self._schedule = 0  # bumped when the rate changes: older slots are void

    def reset(self) -> None:
        """Forgets the schedule: the next copy may start at once."""
        self._next = time.monotonic()
        self._schedule += 1

    async def take(self, rate: int, amount: int) -> None:
        """Waits for the slot of a copy of `amount` bytes at `rate` (0: unlimited)."""
        self._amount = amount
        self._follow(rate)
        while self._rate:
            now = time.monotonic()
            slot = max(self._next, now)
            self._next = slot + amount / self._rate
            schedule = self._schedule
            while (left := slot - time.monotonic()) > 0:
                await asyncio.sleep(min(left, self.RECHECK))
                if self._rate_of is not None:
                    self._follow(self._rate_of())
                if self._schedule != schedule:
                    break  # the rate changed: take a slot of the new schedule
            else:
                return

    def _follow(self, rate: int) -> None:
        if rate != self._rate:
            self._rate = rate
            self.reset()

    async def resumed(self, rate: int) -> None:
        """Called by a worker that waited through a pause: its slot was taken before the
        pause, so it takes a new one before it copies."""
        await self.take(rate, self._amount)


class Jobs:
    def __init__(self, core: Core, etcd: GuardedEtcd, keys: Keys,
                 fail_after: float = 3600.0, busy_copy_blocks: int = 100,
                 history: int = DEFAULT_HISTORY) -> None:
        self._core = core
        self._history = history
        self._etcd = etcd
        self._keys = keys
        self._fail_after = fail_after
        self._records: dict[str, JobRecord] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._resume: dict[str, asyncio.Event] = {}
        self._in_flight: dict[str, int] = {}  # blocks of a job being copied right now
        self._idle: dict[str, asyncio.Event] = {}  # set when a job's in-flight count hits 0
        self._waiting: dict[str, _Waiting] = {}
        # Blocks of every job being copied right now, fewer while clients do I/O.
        self._yield = Yield(lambda: core.foreground_at, FOREGROUND_WINDOW, BUSY_BLOCKS,
                            1 / busy_copy_blocks if busy_copy_blocks else 0.0)

    async def load(self) -> None:
        """Reads every job from etcd and resumes those that were running or paused."""
        for raw in (await self._etcd.etcd.get_prefix(self._keys.jobs)).values():
            record = JobRecord.from_json(raw)
            self._records[record.id] = record
            if record.state in (JobState.RUNNING, JobState.PAUSED):
                self._start(record)
        await self._forget_old()

    # -- queries ---------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        record = self._records.get(job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} does not exist (see `volkin job list`)")
        return record

    def list(self) -> list[JobRecord]:
        return sorted(self._records.values(), key=_order)

    def status(self, record: JobRecord) -> JobStatus:
        done = self.blocks_done(record)
        try:
            block_size = self._core.engine.volume(record.target).block_size
        except VolkinError:
            block_size = 0
        waiting = self._waiting.get(record.id)
        if record.state is JobState.RUNNING and waiting is not None and waiting.reason:
            return JobStatus(record, JobState.WAITING, done, done * block_size,
                             waiting.reason, waiting.seconds())
        return JobStatus(record, record.state, done, done * block_size)

    def blocks_done(self, record: JobRecord) -> int:
        if record.state is JobState.DONE:
            return record.blocks_total
        try:
            info = self._core.engine.info(record.target)
        except VolkinError:
            return 0
        left = info.size_blocks - info.valid_blocks if info.source is not None else 0
        return max(0, record.blocks_total - left)

    # -- commands --------------------------------------------------------------
    async def start_refresh(self, target: str, source: str, rate: int) -> JobRecord:
        if rate < 0:
            raise InvalidArgument(f"rate must be >= 0 bytes per second, got {rate}")
        job_id = await self._new_id()
        # The older copy into the target is abandoned, not finished: cancelled, for good.
        superseded = [replace(other, state=JobState.CANCELLED,
                              error=f"{SUPERSEDED} {job_id} (from {source})")
                      for other in self._records.values()
                      if other.target == target
                      and other.state in (JobState.RUNNING, JobState.PAUSED)]
        made: list[JobRecord] = []

        def records(started: RefreshStarted) -> dict[str, bytes]:
            # The job is stored in the refresh's own transaction: a refresh is never
            # stored without the job that finishes it.
            made.append(JobRecord(job_id, "refresh", target, source, started.blocks_to_copy,
                                  rate))
            return {self._keys.job(r.id): r.to_json() for r in [*superseded, *made]}

        await self._core.start_refresh(target, source, records)
        for old in superseded:
            self._stop_task(old.id)
            self._records[old.id] = old
            event(_log, "job.finished", job=old.id, state=old.state.value, target=old.target,
                  error=old.error)
        record = made[0]
        self._records[record.id] = record
        self._start(record)
        if superseded:
            await self._forget_old()
        return record

    async def start_materialize(self, name: str, rate: int) -> JobRecord:
        """The background copy that makes `name` real (the running one, if there is one)."""
        if rate < 0:
            raise InvalidArgument(f"rate must be >= 0 bytes per second, got {rate}")
        info = self._core.engine.info(name)
        for other in self._records.values():
            if other.target == name and other.state in (JobState.RUNNING, JobState.PAUSED):
                return other
        if info.source is None:
            raise FailedPrecondition(f"volume {name!r} is already real: every block is in its "
                                     f"own memory and it reads through no other volume")
        record = JobRecord(await self._new_id(), "materialize", name, info.source,
                           info.size_blocks - info.valid_blocks, rate)
        await self._store(record)
        self._start(record)
        return record

    async def pause(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record.state is JobState.PAUSED:
            return record
        if record.state is not JobState.RUNNING:
            raise FailedPrecondition(f"job {job_id} is {record.state.value}; only a running "
                                     f"job can be paused")
        self._resume[job_id].clear()  # first: no new block starts from here on
        await self._store(replace(record, state=JobState.PAUSED))
        # Blocks already being copied finish first, so a paused job is still when
        # this returns.
        if self._in_flight.get(job_id):
            self._idle[job_id].clear()
            await self._idle[job_id].wait()
        return self._records[job_id]

    async def cancel(self, job_id: str) -> JobRecord:
        """Stops the job for good: `cancelled`, its task ended at a point where no block
        copy and no detach is in flight. A job that ended meanwhile keeps its end (a
        copy that was finishing ends `done`). Done or cancelled already: refused."""
        record = self.get(job_id)
        if record.state in (JobState.DONE, JobState.CANCELLED):
            raise FailedPrecondition(f"job {job_id} is {record.state.value} already; only a "
                                     f"running, waiting, paused or failed job can be cancelled")
        resume = self._resume.get(job_id)
        if resume is not None:
            resume.clear()  # first: no new block starts from here on
        # The target's family, exclusively: no plan of its blocks and no detach is
        # running while the task stops, so it stops between two steps, as after a pause.
        async with self._core.locks.topology(record.target):
            task = self._tasks.pop(job_id, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            record = self._records[job_id]
            if record.state is JobState.DONE:
                return record
            if self._real(record.target):  # stopped after its detach: the copy is done
                await self._finish(record, JobState.DONE)
                return self._records[job_id]
            await self._store(replace(record, state=JobState.CANCELLED, error=""))
        if job_id in self._waiting:
            self._waiting[job_id].succeeded()
        event(_log, "job.finished", job=job_id, state=JobState.CANCELLED.value,
              target=record.target, error="-")
        await self._forget_old()
        return self._records[job_id]

    def _real(self, name: str) -> bool:
        """Whether volume `name` exists and reads through no other volume any more."""
        try:
            return self._core.engine.info(name).source is None
        except VolkinError:
            return False

    async def set_rate(self, job_id: str, rate: int) -> JobRecord:
        """Stores the job's new rate; a running job's copies take it at their next slot."""
        if rate < 0:
            raise InvalidArgument(f"rate must be >= 0 bytes per second, got {rate}")
        record = self.get(job_id)
        if record.state is JobState.DONE:
            raise FailedPrecondition(f"job {job_id} is done; its rate no longer matters")
        await self._store(replace(record, rate=rate))
        return self._records[job_id]

    async def resume(self, job_id: str) -> JobRecord:
        """Resumes a paused job, or retries a failed or cancelled one from where the maps
        say it is."""
        record = self.get(job_id)
        if record.state is JobState.RUNNING:
            return record
        if record.state is JobState.CANCELLED and record.error.startswith(SUPERSEDED):
            raise FailedPrecondition(f"job {job_id} was {record.error}: {record.target} is "
                                     f"that refresh's now; nothing of {job_id} is left to copy")
        if record.state in (JobState.FAILED, JobState.CANCELLED):
            self._core.engine.info(record.target)  # NotFound if the target is gone
            for other in self._records.values():
                if other.target == record.target and other.state in (JobState.RUNNING,
                                                                       JobState.PAUSED):
                    raise FailedPrecondition(f"job {other.id} copies {record.target} now; "
                                             f"follow that one instead of resuming {job_id}")
            record = replace(record, state=JobState.RUNNING, error="")
            await self._store(record)
            self._start(record)
            event(_log, "job.retried", job=job_id, target=record.target)
            return record
        if record.state is not JobState.PAUSED:
            raise FailedPrecondition(f"job {job_id} is {record.state.value}; only a paused, "
                                     f"failed or cancelled job can be resumed")
        record = replace(record, state=JobState.RUNNING)
        await self._store(record)
        self._resume[job_id].set()
        return record

    async def stop(self) -> None:
        """Stops every job task (the term ends); the next term resumes them from etcd."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    # -- the copy ----------------------------------------------------------------
    def _start(self, record: JobRecord) -> None:
        resume = asyncio.Event()
        if record.state is JobState.RUNNING:
            resume.set()
        self._resume[record.id] = resume
        self._in_flight[record.id] = 0
        self._idle[record.id] = asyncio.Event()
        self._waiting[record.id] = _Waiting()
        self._tasks[record.id] = asyncio.create_task(self._run(record.id), name=record.id)

    async def _run(self, job_id: str) -> None:
        CALL_BUDGET.set(JOB_CALL_BUDGET)  # this task's agent calls report trouble soon
        BACKGROUND.set(True)  # and its copies never hold up a client's
        core = self._core
        try:
            target = self._records[job_id].target
            block_size = core.engine.volume(target).block_size
            throttle = _Throttle(lambda: self._records[job_id].rate)
            # Runs of blocks where the engine plans them as one, single blocks elsewhere
            # (`controller.copywork`). Several workers share the walk: plans of different
            # blocks and runs may run at once, and their commits then share etcd
            # transactions (group commit).
            work = CopyWork(core.engine, target)
            resume = self._resume[job_id]

            # With a rate, one worker at a time waits for the next slot and only then
            # takes its block: a block a client's write copied in the meantime is no
            # longer in line (`CopyWork.next` skips it) and costs no slot.
            one_slot = asyncio.Lock()
            walked = False

            async def next_item() -> Item | None:
                nonlocal walked
                if not self._records[job_id].rate:
                    return await work.next()
                async with one_slot:
                    if walked:
                        return None
                    await throttle.take(self._records[job_id].rate, block_size)
                    item = await work.next()
                    walked = item is None
                    return item

            async def worker() -> None:
                while (item := await next_item()) is not None:
                    if isinstance(item, int):
                        await self._copy(job_id, target, item, resume, throttle)
                        continue
                    first, count = item
                    result = None
                    try:
                        result = await self._copy_run(job_id, target, first, count,
                                                      work.max_data(count), resume, throttle)
                    finally:
                        work.finish(first, count, result)
                    if result is not None and result.done:  # the rate and the clients'
                        # share count the data, not the holes; a block's worth was taken
                        self._yield.charge(-(-result.data // block_size) - 1)
                        if result.data > block_size:
                            await throttle.take(self._records[job_id].rate,
                                                result.data - block_size)

            async with asyncio.TaskGroup() as workers:
                for _ in range(JOB_WORKERS):
                    workers.create_task(worker())
            await self._until_done(job_id, lambda: core.finish_copy(target), resume, throttle)
            await self._finish(self._records[job_id], JobState.DONE)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a job fails visibly, it never kills the controller
            while isinstance(exc, ExceptionGroup):
                exc = exc.exceptions[0]
            if isinstance(exc, Deposed):
                return  # the next controller resumes it; nothing to write
            message = exc.message if isinstance(exc, VolkinError) else f"internal error: {exc!r}"
            if not isinstance(exc, VolkinError):
                _log.exception("job %s failed", job_id)
            try:
                await self._finish(self._records[job_id], JobState.FAILED, message)
            except Deposed:
                return

    async def _copy(self, job_id: str, target: str, block: int, resume: asyncio.Event,
                    throttle: _Throttle) -> None:
        """Copies one block, waiting and retrying while its agent or etcd is away."""
        async def copy() -> None:
            self._in_flight[job_id] += 1
            try:
                await self._core.copy_block(target, block)
            finally:
                self._in_flight[job_id] -= 1
                if not self._in_flight[job_id]:
                    self._idle[job_id].set()
        await self._until_done(job_id, copy, resume, throttle, self._yield)

    async def _copy_run(self, job_id: str, target: str, first: int, count: int,
                        max_data: int | None, resume: asyncio.Event,
                        throttle: _Throttle) -> RunResult | None:
        """Copies a run of blocks as one (`Core.copy_run`), waiting and retrying like a
        block; returns what it found, or None if it is not a run any more."""
        copied: list[RunResult | None] = [None]

        async def copy() -> None:
            self._in_flight[job_id] += 1
            try:
                copied[0] = await self._core.copy_run(target, first, count, max_data)
            finally:
                self._in_flight[job_id] -= 1
                if not self._in_flight[job_id]:
                    self._idle[job_id].set()
        await self._until_done(job_id, copy, resume, throttle, self._yield)
        return copied[0]

    async def _until_done(self, job_id: str, step: Callable[[], Awaitable[None]],
                          resume: asyncio.Event, throttle: _Throttle,
                          admission: Yield | None = None) -> None:
        """Runs `step` until it succeeds; with `admission`, each attempt first waits its
        turn behind clients' I/O (not counted against JOB_STEP_TIMEOUT)."""
        waiting = self._waiting[job_id]
        while True:
            if not resume.is_set():  # paused: `pause` waits for in-flight blocks
                await resume.wait()
                await throttle.resumed(self._records[job_id].rate)
            if admission is not None:
                await admission.enter()
            try:
                async with asyncio.timeout(JOB_STEP_TIMEOUT):
                    await step()
            except (Unavailable, StorageFull, TimeoutError) as exc:
                failure: Exception | None = exc
            else:
                failure = None
            finally:
                if admission is not None:
                    admission.leave()
            if failure is not None:
                reason = (failure.message if isinstance(failure, VolkinError)
                          else self._trouble() or
                          f"a block copy did not finish within {JOB_STEP_TIMEOUT:g} s")
                first = not waiting.reason
                waiting.failed(reason)
                if first:
                    event(_log, "job.waiting", logging.WARNING, job=job_id, reason=reason)
                if waiting.seconds() >= self._fail_after:
                    raise Unavailable(f"gave up after waiting {waiting.seconds():.0f} s: "
                                      f"{reason}") from failure
                await asyncio.sleep(backoff(waiting.failures))
                continue
            if waiting.reason:
                event(_log, "job.continuing", job=job_id, waited=f"{waiting.seconds():.1f}")
                waiting.succeeded()
            return

    def _trouble(self) -> str:
        """The most recent reason an agent or etcd did not answer, if any."""
        troubles = self._core.agents.troubles
        if troubles:
            # A striped job talks to every agent: one agent's absence may show as another's
            # slowness (a copy into it waits for its source), so all of them are named.
            latest, (message, _) = max(troubles.items(), key=lambda t: t[1][1])
            others = sorted(set(troubles) - {latest})
            return message + (f" (agents also retrying: {', '.join(others)})" if others else "")
        return self._etcd.last_error

    def _stop_task(self, job_id: str) -> None:
        task = self._tasks.pop(job_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def target_deleted(self, name: str) -> None:
        """Ends the running or paused jobs whose target `name` was just deleted: failed,
        saying why (resuming one then says the target does not exist)."""
        for record in list(self._records.values()):
            if record.target == name and record.state in (JobState.RUNNING, JobState.PAUSED):
                await self._finish(record, JobState.FAILED, f"its target {name} was deleted")

    async def _finish(self, record: JobRecord, state: JobState, error: str = "") -> None:
        self._stop_task(record.id)
        final = replace(record, state=state, error=error)
        await self._store(final)
        if record.id in self._waiting:
            self._waiting[record.id].succeeded()
        event(_log, "job.finished", job=record.id, state=state.value, target=record.target,
              error=error or "-")
        await self._forget_old()

    def _over(self, record: JobRecord) -> bool:
        """Whether nothing is left to do for the job: done, cancelled, or failed with its
        target deleted (a failed job whose target exists is work left: kept)."""
        if record.state in (JobState.DONE, JobState.CANCELLED):
            return True
        if record.state is not JobState.FAILED:
            return False
        try:
            self._core.engine.info(record.target)
        except NotFound:
            return True
        return False

    async def _forget_old(self) -> None:
        """Deletes the oldest jobs that are over beyond the newest `history` of them. Each
        record goes only if etcd still holds it as it ended, so a job resumed meanwhile is
        kept."""
        if not self._history:
            return
        ended = sorted((r for r in self._records.values() if self._over(r)), key=_order)
        old = ended[:max(0, len(ended) - self._history)]
        forgotten = 0
        for first in range(0, len(old), FORGET_PER_TXN):
            chunk = old[first:first + FORGET_PER_TXN]
            keys = {self._keys.job(r.id): r for r in chunk}
            if not await self._etcd.txn(delete=list(keys), if_values={
                    key: r.to_json() for key, r in keys.items()}):
                return  # one of them changed meanwhile: the next end tries again
            for r in chunk:
                if self._records.get(r.id) is r:
                    del self._records[r.id]
                    self._waiting.pop(r.id, None)
            forgotten += len(chunk)
        if forgotten:
            event(_log, "job.forgotten", jobs=forgotten, oldest=old[0].id, newest=old[-1].id,
                  kept=self._history)

    async def _store(self, record: JobRecord) -> None:
        """Stores the record (guarded by the term's fence), then adopts it: what etcd says
        and what this controller reports never disagree."""
        await self._etcd.put(self._keys.job(record.id), record.to_json())
        self._records[record.id] = record

    async def _new_id(self) -> str:
        return f"j{await self._etcd.increment(self._keys.jobs_next)}"


def _order(record: JobRecord) -> int:
    return int(record.id[1:]) if record.id[1:].isdigit() else 0
