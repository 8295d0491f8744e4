"""Background copy jobs: the copy that turns a refresh target (or a snapshot) real.

A job walks the blocks its target still reads through another volume, one plan
per block under that block's lock, at an optional rate limit, and detaches the
target when none is left. Its progress is not stored anywhere: the maps are the
checkpoint (the blocks left are the target's invalid blocks), so a job resumed
after a pause or a controller restart simply continues with what is left. What
is stored, under `<prefix>/jobs/<id>`, is what the maps cannot say: the job's
kind, target, source, rate, whether it is paused, and how it ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from enum import Enum

from controller.core import Core
from volkin.errors import FailedPrecondition, InvalidArgument, NotFound, VolkinError
from volkin.etcd import Etcd, increment
from volkin.log import event

_log = logging.getLogger("controller.jobs")
# Blocks of one job copied at the same time.
JOB_WORKERS = 64


class JobState(Enum):
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"


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
    bytes_copied: int = 0  # by this controller since the job (re)started

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "state": self.state.value}).encode()

    @staticmethod
    def from_json(raw: bytes) -> JobRecord:
        record = json.loads(raw)
        record["state"] = JobState(record["state"])
        return JobRecord(**record)


class Jobs:
    def __init__(self, core: Core, etcd: Etcd, prefix: str) -> None:
        self._core = core
        self._etcd = etcd
        self._prefix = prefix.rstrip("/")
        self._records: dict[str, JobRecord] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._resume: dict[str, asyncio.Event] = {}
        self._in_flight: dict[str, int] = {}  # blocks of a job being copied right now
        self._idle: dict[str, asyncio.Event] = {}  # set when a job's in-flight count hits 0

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}/jobs/{job_id}"

    async def load(self) -> None:
        """Reads every job from etcd and resumes those that were running."""
        for raw in (await self._etcd.get_prefix(f"{self._prefix}/jobs/")).values():
            record = JobRecord.from_json(raw)
            self._records[record.id] = record
            if record.state in (JobState.RUNNING, JobState.PAUSED):
                self._start(record)

    # -- queries ---------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        record = self._records.get(job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} does not exist (see `volkin job list`)")
        return record

    def list(self) -> list[JobRecord]:
        return sorted(self._records.values(), key=_order)

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
        started = await self._core.start_refresh(target, source)
        for other in list(self._records.values()):
            if other.target == target and other.state in (JobState.RUNNING, JobState.PAUSED):
                await self._finish(other, JobState.DONE, "superseded by a newer refresh")
        record = JobRecord(await self._new_id(), "refresh", target, source,
                           started.blocks_to_copy, rate)
        await self._store(record)
        self._start(record)
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
        record = replace(record, state=JobState.PAUSED)
        await self._store(record)
        # Blocks already being copied finish first, so a paused job is still when
        # this returns.
        if self._in_flight.get(job_id):
            self._idle[job_id].clear()
            await self._idle[job_id].wait()
        return self._records[job_id]

    async def resume(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record.state is JobState.RUNNING:
            return record
        if record.state is not JobState.PAUSED:
            raise FailedPrecondition(f"job {job_id} is {record.state.value}; only a paused "
                                     f"job can be resumed")
        record = replace(record, state=JobState.RUNNING)
        await self._store(record)
        self._resume[job_id].set()
        return record

    async def stop(self) -> None:
        """Stops every job task (a controller shutting down); they resume on the next start."""
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
        self._tasks[record.id] = asyncio.create_task(self._run(record.id), name=record.id)

    async def _run(self, job_id: str) -> None:
        core = self._core
        try:
            target = self._records[job_id].target
            block_size = core.engine.volume(target).block_size
            started = time.monotonic()
            # Lazily: the iterator walks a snapshot of the map, segment by segment, so a
            # 1 TiB target does not become a list of 16 million block numbers. Several
            # workers share it: plans of different blocks may run at once, and their
            # commits then share etcd transactions (group commit).
            blocks = enumerate(core.engine.blocks_to_copy(target))

            resume = self._resume[job_id]
            idle = self._idle[job_id]

            async def worker() -> None:
                for copied, block in blocks:
                    rate = self._records[job_id].rate
                    if rate:
                        # Throttle: never ahead of rate * elapsed.
                        ahead = copied * block_size / rate - (time.monotonic() - started)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                    while not resume.is_set():  # paused: `pause` waits for in-flight blocks
                        await resume.wait()
                    self._in_flight[job_id] += 1  # no await since the check above
                    try:
                        await core.copy_block(target, block)
                    finally:
                        self._in_flight[job_id] -= 1
                        if not self._in_flight[job_id]:
                            idle.set()
                    record = self._records[job_id]
                    self._records[job_id] = replace(
                        record, bytes_copied=record.bytes_copied + block_size)

            async with asyncio.TaskGroup() as workers:
                for _ in range(JOB_WORKERS):
                    workers.create_task(worker())
            await core.finish_copy(target)
            await self._finish(self._records[job_id], JobState.DONE)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a job fails visibly, it never kills the controller
            if isinstance(exc, ExceptionGroup):
                exc = exc.exceptions[0]
            _log.exception("job %s failed", job_id)
            await self._finish(self._records[job_id], JobState.FAILED, str(exc))

    async def _finish(self, record: JobRecord, state: JobState, error: str = "") -> None:
        task = self._tasks.pop(record.id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        final = replace(record, state=state, error=error)
        await self._store(final)
        event(_log, "job.finished", job=record.id, state=state.value, target=record.target,
              error=error or "-")

    async def _store(self, record: JobRecord) -> None:
        self._records[record.id] = record
        await self._etcd.put(self._key(record.id), record.to_json())

    async def _new_id(self) -> str:
        return f"j{await increment(self._etcd, f'{self._prefix}/jobs-next')}"


def _order(record: JobRecord) -> int:
    return int(record.id[1:]) if record.id[1:].isdigit() else 0
