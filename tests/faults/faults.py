"""The fault kinds: what each one breaks, and how the cluster is brought back.

Each kind is a function of the trial's `Stage`. It injects its fault at once,
brings back what it broke the way an operator's systemd would (a process killed
with -9 is started again after a random short delay; a stopped one gets
SIGCONT), and returns when the last action is done. The trial then waits for
writes to flow and for the jobs to complete, and checks everything.

- controller: kill -9 of the leader; restarted after 0.2-1.5 s (the standby may lead first)
- controller-and-agent: kill -9 of the leader and of one agent; each back after its own delay
- controller-stop: SIGSTOP of the leader until the standby serves, plus 0-1 s; SIGCONT
- agent: kill -9 of one agent; restarted on its port after 0.2-1.5 s
- two-agents: kill -9 of two agents; each back after its own delay
- etcd: kill -9 of etcd; restarted on its ports and data after 0.2-1.5 s
- etcd-stop-short: SIGSTOP of etcd for 0.3-0.6 of the lease; SIGCONT
- etcd-stop-long: SIGSTOP of etcd for 1.3-2 leases; SIGCONT
- split-brain: SIGSTOP of the leader; once the standby serves, the writers are held and a
  snapshot S1 of V1 is taken through the new leader; one write to V1 is queued on each of
  four connections to the old leader; SIGCONT; 0-0.5 s later the writers go on. The queued
  writes must never be acknowledged nor land.

docs/faults.md says the same for people.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.faults.cluster import Cluster, Daemon, Timeline
from tests.faults.model import Model
from tests.faults.writers import Connection, QueuedWrites, Writer, write_cells
from volkin.api.v1 import admin_pb2

# A killed process is brought back after this many seconds (uniformly drawn).
RESTART_DELAY = (0.2, 1.5)
# How long a new leader may take to serve after the old one stopped.
TAKEOVER_TIMEOUT = 30.0


@dataclass
class Stage:
    """What a fault may touch: the cluster, the writers, the model, the trial's dice."""

    cluster: Cluster
    model: Model
    writers: list[Writer]
    rng: random.Random
    timeline: Timeline
    lease_ttl: int
    size: int
    # Blocks of V1 that no writer owns: the split brain queues its writes there.
    spare_blocks: list[int]
    cells_per_block: int
    # Set by the faults, read by the trial.
    extra_volumes: list[str] = field(default_factory=list)  # created during the fault
    held: list[tuple[float, float]] = field(default_factory=list)  # writers held on purpose
    queued: list[QueuedWrites] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _delay(stage: Stage) -> float:
    return stage.rng.uniform(*RESTART_DELAY)


def _leader_daemon(stage: Stage) -> Daemon:
    leader = stage.cluster.wait_leader(TAKEOVER_TIMEOUT)
    daemon = stage.cluster.controller(leader.pid)
    if daemon is None:
        raise RuntimeError(f"etcd names pid {leader.pid} leader, which the trial did not start")
    return daemon


def _kill_and_restart(stage: Stage, daemons: list[Daemon]) -> None:
    """kill -9 every daemon at once; bring each back after its own random delay."""
    plan = sorted(((_delay(stage), d) for d in daemons), key=lambda p: p[0])
    start = time.monotonic()
    for daemon in daemons:
        stage.cluster.hold(daemon)
        pid = daemon.pid
        daemon.kill()
        stage.timeline.note(f"fault: kill -9 {daemon.name} (pid {pid})")
    for delay, daemon in plan:
        time.sleep(max(0.0, start + delay - time.monotonic()))
        stage.cluster.release(daemon)


def controller(stage: Stage) -> None:
    _kill_and_restart(stage, [_leader_daemon(stage)])


def controller_and_agent(stage: Stage) -> None:
    _kill_and_restart(stage, [_leader_daemon(stage), stage.rng.choice(stage.cluster.agents)])


def agent(stage: Stage) -> None:
    _kill_and_restart(stage, [stage.rng.choice(stage.cluster.agents)])


def two_agents(stage: Stage) -> None:
    _kill_and_restart(stage, list(stage.rng.sample(stage.cluster.agents, 2)))


def _stop_leader_until_takeover(stage: Stage) -> Daemon:
    """SIGSTOPs the leader and returns once another controller serves."""
    old = _leader_daemon(stage)
    stage.cluster.hold(old)
    pid = old.pid
    old.signal(signal.SIGSTOP)
    stage.timeline.note(f"fault: SIGSTOP {old.name} (pid {pid}), the leader")
    new = stage.cluster.wait_leader(TAKEOVER_TIMEOUT, other_than=pid)
    stage.timeline.note(f"{new.node_id} (pid {new.pid}) leads, nbd {new.nbd}")
    return old


def _resume(stage: Stage, daemon: Daemon) -> None:
    daemon.signal(signal.SIGCONT)
    stage.timeline.note(f"fault: SIGCONT {daemon.name} (pid {daemon.pid})")
    stage.cluster.release(daemon)


def controller_stop(stage: Stage) -> None:
    old = _stop_leader_until_takeover(stage)
    time.sleep(stage.rng.uniform(0.0, 1.0))
    _resume(stage, old)


def etcd(stage: Stage) -> None:
    server = stage.cluster.etcd
    assert server.process is not None
    pid = server.process.pid
    server.process.kill()
    server.process.wait()
    stage.timeline.note(f"fault: kill -9 etcd (pid {pid})")
    time.sleep(_delay(stage))
    server.restart()
    stage.timeline.note(f"etcd restarted (pid {stage.cluster.etcd_pid})")


def _stop_etcd(stage: Stage, leases: tuple[float, float]) -> None:
    pid = stage.cluster.etcd_pid
    seconds = stage.rng.uniform(*leases) * stage.lease_ttl
    stage.cluster.etcd_signal(signal.SIGSTOP)
    stage.timeline.note(f"fault: SIGSTOP etcd (pid {pid}) for {seconds:.2f}s")
    time.sleep(seconds)
    stage.cluster.etcd_signal(signal.SIGCONT)
    stage.timeline.note("fault: SIGCONT etcd")


def etcd_stop_short(stage: Stage) -> None:
    _stop_etcd(stage, (0.3, 0.6))


def etcd_stop_long(stage: Stage) -> None:
    _stop_etcd(stage, (1.3, 2.0))


def prepare_split_brain(stage: Stage) -> None:
    """Connections to V1 on the leader, to queue writes on once it is deposed.

    The spare blocks are written once first, through the leader: a write to V1 during
    the refresh copies its block to V2 before it lands (Fig 8), so afterwards the
    leader's maps send a write to those blocks straight to V1's extent. That is the
    path a deposed leader takes without asking etcd anything.
    """
    per_block = stage.cells_per_block
    for block in stage.spare_blocks:
        cells = list(range(block * per_block, (block + 1) * per_block))
        write_cells(stage.cluster, stage.model, "V1", cells, "spare")
    leader = stage.cluster.wait_leader(TAKEOVER_TIMEOUT)
    for _ in stage.spare_blocks:
        stage.queued.append(QueuedWrites(Connection.open(leader, "V1", timeout=10)))


def split_brain(stage: Stage) -> None:
    # The writers issue nothing new from the moment the leader stops (what they have in
    # flight there they give up once the standby leads: unknown), so that the new leader
    # does no I/O to V1 before the old one runs again: nothing on the agents has seen the
    # new epoch through V1's extent. S1 is then taken through the new leader.
    for writer in stage.writers:
        writer.hold()
    old = _stop_leader_until_takeover(stage)
    held_at = time.time()  # until now the writers would have waited on the old leader anyway
    for writer in stage.writers:
        writer.wait_quiet(TAKEOVER_TIMEOUT)
    stage.cluster.admin(lambda admin: admin.CreateSnapshot(
        admin_pb2.CreateSnapshotRequest(source="V1", name="S1"), timeout=10),
        what="snapshot S1 of V1")
    stage.model.copy("S1", "V1")
    stage.extra_volumes.append("S1")
    stage.timeline.note("S1 := V1 through the new leader")
    # Writes queued on the deposed leader: the S1 model above does not have them, and
    # nothing may ever acknowledge them.
    # One write per connection, so that the old leader reads them all at once: whole
    # blocks and runs of 1-4 cells (which take different paths through a block).
    per_block = stage.cells_per_block
    for index, (queued, block) in enumerate(zip(stage.queued, stage.spare_blocks,
                                                strict=True)):
        if index % 2 == 0:
            queued.queue(stage.model, list(range(block * per_block, (block + 1) * per_block)))
        else:
            count = stage.rng.randint(1, 4)
            start = block * per_block + stage.rng.randrange(per_block - count + 1)
            queued.queue(stage.model, list(range(start, start + count)))
    stage.timeline.note(f"queued {sum(len(q.requests) for q in stage.queued)} writes to V1 "
                        f"on connections to {old.name}")
    _resume(stage, old)
    time.sleep(stage.rng.uniform(0.0, 0.5))
    for writer in stage.writers:
        writer.resume()
    stage.held.append((held_at, time.time()))
    for queued in stage.queued:
        queued.wait(stage.model, 15.0)
        stage.timeline.note(f"queued writes on {old.name}: {queued.outcome}")


@dataclass(frozen=True)
class FaultKind:
    name: str
    inject: Callable[[Stage], None]
    prepare: Callable[[Stage], None] | None = None


KINDS: dict[str, FaultKind] = {k.name: k for k in [
    FaultKind("controller", controller),
    FaultKind("controller-and-agent", controller_and_agent),
    FaultKind("controller-stop", controller_stop),
    FaultKind("agent", agent),
    FaultKind("two-agents", two_agents),
    FaultKind("etcd", etcd),
    FaultKind("etcd-stop-short", etcd_stop_short),
    FaultKind("etcd-stop-long", etcd_stop_long),
    FaultKind("split-brain", split_brain, prepare_split_brain),
]}
