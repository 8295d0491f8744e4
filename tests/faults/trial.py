"""One fault trial, start to verdict, and the results of many.

A trial, all of it decided by its seed (except what threads and processes race on):

1. start etcd, three agents and two controllers (one leads, one waits);
2. create V1 and V2 (4 MiB, 64 KiB blocks), fill both, snapshot S2 of V2, start
   `refresh V2 --from V1` at a rate that makes the copy last 4-8 s;
   the model copies along: S2 := V2, V2 := V1;
3. start 2-4 writers on V1, V2 and S2, each on its own blocks;
4. after 0.5-2 s inject one fault (`faults.KINDS`), which brings back what it broke;
5. wait until every writer has its writes acknowledged again (the gap is the
   trial's unavailability), let them run a little more, stop them;
6. wait for the refresh job to be done (JOB_STATE_WAITING on the way is fine);
7. read every volume through the leader and check each cell against the model;
   check that no deposed controller acknowledged anything.

Any violation fails the trial with the seed, the fault kind, the volume, the
offset, what was read and what the model allows, then the trial's timeline and
the daemons' warnings.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from tests.faults import faults
from tests.faults.cluster import Cluster, Timeline
from tests.faults.model import CELL, Model, ServingRecord, Violation, longest_gap
from tests.faults.results import MAX_REPORTED, TrialResult
from tests.faults.writers import Writer, fill, read_volume
from volkin.api.v1 import admin_pb2

MiB = 1 << 20
SIZE = 4 * MiB
BLOCK = 64 * 1024
LEASE_TTL = 3  # controllers' and agents' lease, seconds
# After the fault is over: how long writes may take to flow again, and the job to end.
FLOW_BOUND = 60.0
JOB_BOUND = 90.0
# Blocks a writer owns (few, so that cells are written again and again).
BLOCKS_PER_WRITER = 6
# Blocks of V1 that no writer owns: the split brain's queued writes go there.
SPARE_BLOCKS = 4

_STATE = {v: k.removeprefix("JOB_STATE_").lower()
          for k, v in admin_pb2.JobState.items()}


def trial_seed(base: int, kind: str, index: int) -> int:
    """The seed of trial `index` of `kind` in a run seeded `base` (stable across runs)."""
    return random.Random(f"{base}/{kind}/{index}").getrandbits(32)


def run_trial(kind: str, seed: int, root: Path) -> TrialResult:
    """Runs one trial of fault `kind` in directory `root`; never raises for a failure."""
    fault = faults.KINDS[kind]
    rng = random.Random(seed)
    timeline = Timeline()
    model = Model(start=timeline.start)
    cluster = Cluster(root, timeline, lease_ttl=LEASE_TTL)
    result = TrialResult(kind, seed)
    writers: list[Writer] = []
    stage: faults.Stage | None = None

    def fail(violation: Violation | str, what: str = "trial") -> None:
        if isinstance(violation, Violation):
            text, what = violation.describe(), violation.what
            count = 1 if what == "deposed ack" else violation.cells * CELL
        else:
            text, count = violation, 1
        result.found[what] = result.found.get(what, 0) + count
        result.violations.append(f"[seed={seed} fault={kind}] {text}")

    try:
        cluster.start()
        job_id = _set_up(cluster, model, rng, timeline)
        writers, spare = _writers(cluster, model, rng)
        stage = faults.Stage(cluster, model, writers, rng, timeline, LEASE_TTL, SIZE, spare,
                             BLOCK // CELL)
        if fault.prepare is not None:
            fault.prepare(stage)
        for writer in writers:
            writer.start()
        timeline.note("writers: " + ", ".join(f"{w!r} blocks {w.blocks}" for w in writers))
        time.sleep(rng.uniform(0.5, 2.0))

        injected = time.time()
        timeline.note(f"inject {kind}")
        fault.inject(stage)
        over = time.time()
        timeline.note(f"fault {kind} over")
        flowing = _wait_for_flow(writers, over, FLOW_BOUND)
        if flowing is None:
            stuck = [repr(w) for w in writers if w.acks_since(over) < 3]
            fail(f"I/O did not resume: no acknowledgements for {', '.join(stuck)} within "
                 f"{FLOW_BOUND:.0f}s after the fault was over", what="io stuck")
        else:
            timeline.note(f"writes flow again after {flowing - over:.2f}s")
        time.sleep(rng.uniform(0.5, 1.5))
        end = time.time()
        for writer in writers:
            writer.finish(faults.TAKEOVER_TIMEOUT + 60)
        for writer in writers:
            if writer.failure is not None:
                fail(f"writer {writer!r} crashed: {writer.failure!r}", what="harness")
        result.unavailability = round(max(
            longest_gap(w.acks, injected, end, stage.held) for w in writers), 3)
        timeline.note(f"writers stopped; unavailability {result.unavailability:.2f}s")

        result.job = _wait_for_job(cluster, job_id, JOB_BOUND, timeline, fail)
        for volume in ["V1", "V2", "S2", *stage.extra_volumes]:
            try:
                data = read_volume(cluster, volume, SIZE)
            except TimeoutError as exc:
                fail(f"cannot read {volume} back: {exc}", what="read failed")
                continue
            for violation in model.check(volume, data):
                fail(violation)
        for violation in model.never_acknowledged():
            fail(violation)
        servings = [ServingRecord(s.at, s.nbd, s.pid, s.epoch) for s in cluster.servings()]
        for violation in model.deposed_acks(servings):
            fail(violation)
    except Exception:
        fail(f"the trial could not go on:\n{traceback.format_exc()}", what="harness")
    finally:
        try:
            for writer in writers:
                if writer.is_alive():
                    writer.finish(5)
            for queued in stage.queued if stage else []:
                queued.conn.close()
        finally:
            cluster.close()
    records = list(model.writes.values())
    result.writes = len(records)
    result.unknown = sum(1 for r in records if r.state == "unknown")
    result.seconds = round(time.time() - timeline.start, 1)
    result.report = _report(result, cluster, timeline, writers, root)
    return result


def _set_up(cluster: Cluster, model: Model, rng: random.Random, timeline: Timeline) -> str:
    for name in ("V1", "V2"):
        cluster.admin(lambda admin, n=name: admin.CreateVolume(  # type: ignore[misc]
            admin_pb2.CreateVolumeRequest(name=n, size_bytes=SIZE, block_size=BLOCK),
            timeout=10), what=f"create {name}")
        model.create(name, SIZE)
        fill(cluster, model, name, SIZE)
    cluster.admin(lambda admin: admin.CreateSnapshot(
        admin_pb2.CreateSnapshotRequest(source="V2", name="S2"), timeout=10), what="snapshot S2")
    model.copy("S2", "V2")
    rate = int(SIZE / rng.uniform(4.0, 8.0))
    job = cluster.admin(lambda admin: admin.StartRefresh(admin_pb2.StartRefreshRequest(
        target="V2", source="V1", rate_bytes_per_second=rate), timeout=10),
        what="refresh V2 from V1")
    model.copy("V2", "V1")
    timeline.note(f"V1, V2 filled; S2 := V2; refresh V2 --from V1 at {rate} B/s: job {job.id}")
    return str(job.id)


def _writers(cluster: Cluster, model: Model,
             rng: random.Random) -> tuple[list[Writer], list[int]]:
    """2-4 writers on V1, V2 and S2 (the first on V1), each on blocks of its own; and
    `SPARE_BLOCKS` blocks of V1 that none of them writes."""
    blocks = SIZE // BLOCK
    free = {v: rng.sample(range(blocks), blocks) for v in ("V1", "V2", "S2")}
    spare = [free["V1"].pop() for _ in range(SPARE_BLOCKS)]
    writers = []
    for index in range(rng.randint(2, 4)):
        volume = "V1" if index == 0 else rng.choice(["V1", "V2", "S2"])
        owned = sorted(free[volume].pop() for _ in range(BLOCKS_PER_WRITER))
        writers.append(Writer(f"w{index + 1}", volume, owned, BLOCK // CELL, model, cluster,
                              random.Random(rng.getrandbits(32))))
    return writers, spare


def _wait_for_flow(writers: list[Writer], since: float, bound: float) -> float | None:
    """When every writer has had 3 writes acknowledged after `since`; None past `bound`."""
    deadline = time.time() + bound
    while time.time() < deadline:
        if all(w.acks_since(since) >= 3 or not w.is_alive() for w in writers):
            return time.time()
        time.sleep(0.05)
    return None


def _wait_for_job(cluster: Cluster, job_id: str, bound: float, timeline: Timeline,
                  fail: Callable[..., None]) -> str:
    """Follows the job until it is done; reports it (through `fail`) if it fails or
    does not finish within `bound` seconds."""
    deadline = time.monotonic() + bound
    seen = ""
    while True:
        remaining = deadline - time.monotonic()
        try:
            job = cluster.admin(lambda admin: admin.GetJob(
                admin_pb2.GetJobRequest(id=job_id), timeout=5), timeout=max(remaining, 1),
                what=f"get job {job_id}")
        except TimeoutError as exc:
            fail(f"job {job_id}: {exc}", what="job")
            return "unknown"
        state = _STATE.get(job.state, str(job.state))
        detail = f"{state} {job.blocks_done}/{job.blocks_total}"
        if job.state == admin_pb2.JOB_STATE_WAITING:
            detail += f" waiting {job.waiting_seconds:.1f}s: {job.reason}"
        if state != seen:
            timeline.note(f"job {job_id} {detail}")
            seen = state
        if job.state == admin_pb2.JOB_STATE_DONE:
            return detail
        if job.state == admin_pb2.JOB_STATE_FAILED:
            fail(f"job {job_id} failed: {job.error!r}", what="job failed")
            return detail
        if remaining <= 0:
            fail(f"job {job_id} did not complete within {bound:.0f}s after the fault: "
                 f"{detail}", what="job not done")
            return detail
        time.sleep(0.25)


def _report(result: TrialResult, cluster: Cluster, timeline: Timeline,
            writers: list[Writer], root: Path) -> str:
    shown = result.violations[:MAX_REPORTED]
    more = len(result.violations) - len(shown)
    verdict = "passed" if result.passed else "FAILED"
    parts = [f"{verdict} trial: fault={result.kind} seed={result.seed} dir={root}",
             f"replay: python3 -m tests.faults.soak --kinds {result.kind} "
             f"--trial-seed {result.seed}",
             *shown]
    if more:
        parts.append(f"... and {more} more violations")
    parts.append("timeline:")
    parts.append(timeline.render())
    for writer in writers:
        parts.append(f"{writer!r}: {len(writer.acks)} acknowledged, {writer.errors} error "
                     f"replies, {writer.reconnects} connections; last notes: "
                     + "; ".join(writer.notes[-4:]))
    parts.append("daemon logs (warnings, errors, leadership, jobs):")
    parts.append(cluster.log_excerpts())
    return "\n".join(parts)
