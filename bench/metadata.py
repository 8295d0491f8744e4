"""Metadata at scale (issue 7): many volumes, snapshots beside I/O, take-over, etcd's size.

    python3 -m bench.metadata [--volumes 10000] [--cycles 20000] [--compact-every 60]

Starts a real etcd, two agents and a controller on loopback (`bench.loopback`) and
measures, in this order:

1. create latency of `--volumes` 1 MiB volumes made one after another through the
   admin API: the first 100 against the last 500;
2. ListVolumes at that many volumes, against ListVolumes at 100;
3. CreateSnapshot + DeleteVolume of a volume B while fio (ioengine=nbd) writes to an
   unrelated volume A: snapshot latency with fio against without, fio's completion
   latency with snapshots against without, interleaved `--rounds` times; one etcd
   transaction (a put from the same client library) is the yardstick for a stall.
   The snapshots beside fio run one after another, or `--pace` a second;
4. take-over: a standby waits, the leader is killed with SIGKILL, and the standby's
   log says when it led (`controller.leader`), fenced the agents (`controller.fenced`)
   and served (`controller.serving`);
5. etcd's database size after the creates and during `--cycles` snapshot
   create/delete cycles of B through the admin API.

`--profile DIR` records each phase of the controller that serves it with py-spy
(collapsed stacks, `DIR/<phase>.txt`): for finding out why, not for the numbers.
`--keep` leaves the cluster's directory (every process's log) behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench import fio
from bench.fio import FioResult, fio_result
from bench.loopback import Loopback
from tests.controller.conftest import Controller
from volkin import etcd
from volkin.api.v1 import admin_pb2, admin_pb2_grpc

MiB = 1 << 20
FIO_SIZE = 256 * MiB
FIRST = 100  # creates in the "first" sample
LAST = 500  # creates in the "last" sample


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def timed(call: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def etcd_status(endpoint: str) -> etcd.EtcdStatus:
    async def run() -> etcd.EtcdStatus:
        client = await etcd.connect([endpoint])
        try:
            return await client.status()
        finally:
            await client.close()
    return asyncio.run(run())


def etcd_put_latencies(endpoint: str, count: int = 300) -> list[float]:
    """Latencies of single puts of a 1 KiB value (outside volkin's prefix): what one
    etcd transaction costs a Python client on this machine."""
    async def run() -> list[float]:
        client = await etcd.connect([endpoint])
        try:
            times = []
            for i in range(count):
                start = time.perf_counter()
                await client.put("/bench/probe", bytes(1024 - len(str(i))) + str(i).encode())
                times.append(time.perf_counter() - start)
            await client.delete("/bench/probe")
            return times
        finally:
            await client.close()
    return asyncio.run(run())


@contextlib.contextmanager
def profiled(controller: Controller, directory: Path | None, phase: str) -> Iterator[None]:
    """py-spy records `controller` while the block runs, if `directory` is given."""
    if directory is None or controller.process is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(controller.process.pid), "--format", "raw",
         "--rate", "50", "--nonblocking", "--output", str(directory / f"{phase}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


# -- 3. snapshots beside fio ------------------------------------------------------------

def start_fio(nbd: str, volume: str, seconds: float, rw: str = "randwrite",
              time_based: bool = True) -> subprocess.Popen[bytes]:
    return fio.start_fio(f"nbd://{nbd}/{volume}", f"--rw={rw}", "--bs=64k", "--iodepth=1",
                         f"--size={FIO_SIZE}",
                         *([f"--runtime={seconds}", "--time_based"] if time_based else []))


def running(process: subprocess.Popen[bytes]) -> Callable[[int], bool]:
    """An `until` for `snapshot_cycles`: until the process has ended."""
    return lambda done: process.poll() is not None


@dataclass
class Snapshots:
    creates: list[float]
    deletes: list[float]


def snapshot_cycles(admin: admin_pb2_grpc.AdminStub, volume: str, tag: str,
                    until: Callable[[int], bool], pace: float = 0.0) -> Snapshots:
    """CreateSnapshot then DeleteVolume of a snapshot of `volume`, until `until(done)`;
    `pace` cycles a second at most (0: one after another)."""
    done = Snapshots([], [])
    started = time.monotonic()
    while not until(len(done.creates)):
        if pace:
            time.sleep(max(0.0, started + len(done.creates) / pace - time.monotonic()))
        name = f"{tag}{len(done.creates)}"
        done.creates.append(timed(admin.CreateSnapshot,
                                  admin_pb2.CreateSnapshotRequest(source=volume, name=name)))
        done.deletes.append(timed(admin.DeleteVolume, admin_pb2.DeleteVolumeRequest(name=name)))
    return done


# -- 4. take-over -----------------------------------------------------------------------

@dataclass
class Takeover:
    to_leader: float  # kill → controller.leader: the lease TTL and the standby's next try
    to_fenced: float  # controller.leader → controller.fenced: fencing the agents
    to_serving: float  # controller.fenced → controller.serving: loading records and segments
    volumes: int

    @property
    def total(self) -> float:
        return self.to_leader + self.to_fenced + self.to_serving


def log_time(log: str, name: str) -> float:
    found = re.findall(rf"ts=(\S+) level=\w+ event={re.escape(name)} ", log)
    if not found:
        raise RuntimeError(f"no {name} in the log:\n{log[-3000:]}")
    stamp = datetime.strptime(found[-1], "%Y-%m-%dT%H:%M:%S.%fZ")
    return (stamp - datetime(1970, 1, 1)).total_seconds()


def take_over(leader: Controller, standby: Controller) -> Takeover:
    killed = time.time()
    leader.kill()
    standby.wait_serving(timeout=300)
    log = standby.log()
    led, fenced, serving = (log_time(log, e) for e in
                            ("controller.leader", "controller.fenced", "controller.serving"))
    count = re.findall(r"event=controller\.serving .* volumes=(\d+)", log)
    return Takeover(led - killed, fenced - led, serving - fenced, int(count[-1]))


# -- the run ----------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=20_000,
                        help="snapshot create/delete cycles for the etcd size")
    parser.add_argument("--compact-every", type=float, default=60.0,
                        help="the controller's --compact-every, seconds")
    parser.add_argument("--lease-ttl", type=int, default=2, help="the controllers' lease TTL")
    parser.add_argument("--fio-seconds", type=float, default=15.0)
    parser.add_argument("--snapshots", type=int, default=100,
                        help="snapshot cycles without fio, per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of phase 3")
    parser.add_argument("--pace", type=float, default=0.0,
                        help="snapshot cycles a second beside fio (0: one after another)")
    parser.add_argument("--takeovers", type=int, default=2)
    parser.add_argument("--profile", type=Path, help="py-spy each phase into this directory")
    parser.add_argument("--keep", action="store_true",
                        help="keep the cluster's directory (logs) afterwards")
    args = parser.parse_args()
    total_cycles: int = args.cycles
    wall = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - wall:7.1f} s] {text}", flush=True)

    rows: list[tuple[str, str, str, str]] = []  # measure, goal, measured, peer and ratio
    with Loopback(controller_args=("--compact-every", str(args.compact_every),
                                   "--lease-ttl", str(args.lease_ttl)),
                  keep=args.keep) as cluster:
        leader = cluster.start()
        admin = leader.stub
        say(f"cluster up in {cluster.work}")

        # 1 and 2: creates and listings.
        creates: list[float] = []
        listing_at_first: list[float] = []
        with profiled(leader, args.profile, "creates"):
            for i in range(args.volumes):
                creates.append(timed(admin.CreateVolume, admin_pb2.CreateVolumeRequest(
                    name=f"v{i:05d}", size_bytes=MiB)))
                if i + 1 == FIRST:
                    listing_at_first = [timed(admin.ListVolumes, admin_pb2.ListVolumesRequest())
                                        for _ in range(5)]
                if (i + 1) % 1000 == 0:
                    say(f"{i + 1} volumes; median create of the last 1000 "
                        f"{ms(median(creates[-1000:]))}")
        created_in = sum(creates)
        with profiled(leader, args.profile, "list"):
            listing = [timed(admin.ListVolumes, admin_pb2.ListVolumesRequest())
                       for _ in range(5)]
        listed = len(admin.ListVolumes(admin_pb2.ListVolumesRequest()).volumes)
        assert listed == args.volumes, listed
        after_creates = etcd_status(cluster.etcd.endpoint)
        first, last = creates[:FIRST], creates[-LAST:]
        rows.append((f"create latency, first {FIRST} (median / p90)", "—",
                     f"{ms(median(first))} / {ms(percentile(first, 90))}", ""))
        rows.append((f"create latency, last {LAST} at {args.volumes} (median / p90)",
                     "≤ 1.5 x first", f"{ms(median(last))} / {ms(percentile(last, 90))}",
                     f"x {median(last) / median(first):.2f} / "
                     f"x {percentile(last, 90) / percentile(first, 90):.2f} of first"))
        rows.append((f"ListVolumes at {args.volumes} (median of 5)", "< 1 s",
                     ms(median(listing)),
                     f"at {FIRST}: {ms(median(listing_at_first))}, "
                     f"x {median(listing) / median(listing_at_first):.0f}"))
        say(f"{args.volumes} creates took {created_in:.0f} s")

        # 3: snapshots of B while fio writes to A.
        admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="fioA", size_bytes=FIO_SIZE))
        admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="snapB", size_bytes=FIO_SIZE))
        fio_result(start_fio(leader.nbd, "fioA", 0, rw="write", time_based=False))  # fill A
        etcd_txn = etcd_put_latencies(cluster.etcd.endpoint)
        alone: list[FioResult] = []
        beside: list[FioResult] = []
        quiet = Snapshots([], [])
        busy = Snapshots([], [])
        with profiled(leader, args.profile, "snapshots"):
            for r in range(args.rounds):
                alone.append(fio_result(start_fio(leader.nbd, "fioA", args.fio_seconds)))
                got = snapshot_cycles(admin, "snapB", f"q{r}-", lambda n: n >= args.snapshots)
                quiet.creates += got.creates
                quiet.deletes += got.deletes
                fio = start_fio(leader.nbd, "fioA", args.fio_seconds)
                time.sleep(1.0)  # fio connected and writing
                got = snapshot_cycles(admin, "snapB", f"b{r}-", running(fio), args.pace)
                beside.append(fio_result(fio))
                busy.creates += got.creates
                busy.deletes += got.deletes
                say(f"round {r + 1}: fio p99 alone {ms(alone[-1].p99)}, beside snapshots "
                    f"{ms(beside[-1].p99)}; {len(got.creates)} snapshots beside fio")
        rows.append(("one etcd transaction (1 KiB put, median / p99)", "yardstick",
                     f"{ms(median(etcd_txn))} / {ms(percentile(etcd_txn, 99))}", ""))
        rows.append((f"CreateSnapshot of B without fio ({len(quiet.creates)}, median / p99)",
                     "—", f"{ms(median(quiet.creates))} / {ms(percentile(quiet.creates, 99))}",
                     ""))
        paced = f"{args.pace:g}/s" if args.pace else "back to back"
        rows.append((f"CreateSnapshot of B, fio on A ({len(busy.creates)} {paced}, "
                     f"median / p99)",
                     "no stall",
                     f"{ms(median(busy.creates))} / {ms(percentile(busy.creates, 99))}",
                     f"x {median(busy.creates) / median(quiet.creates):.2f} / "
                     f"x {percentile(busy.creates, 99) / percentile(quiet.creates, 99):.2f}"
                     " of without"))
        rows.append(("DeleteVolume of the snapshot, without / with fio (median)", "—",
                     f"{ms(median(quiet.deletes))} / {ms(median(busy.deletes))}", ""))
        for label, runs in (("alone", alone), (f"beside snapshots of B ({paced})", beside)):
            rows.append((f"fio 64 KiB randwrite on A, {label} (p50 / p99 / max per round)",
                         "no stall beyond one etcd txn" if runs is beside else "—",
                         " ; ".join(f"{ms(f.p50)} / {ms(f.p99)} / {ms(f.max)}" for f in runs),
                         " ; ".join(f"{f.iops:.0f} IOPS" for f in runs)))

        # 4: take-over.
        takeovers: list[Takeover] = []
        for t in range(args.takeovers):
            standby = cluster.controller(f"c{t + 2}", standby=True)
            with profiled(standby, args.profile, f"takeover{t + 1}"):
                takeovers.append(take_over(leader, standby))
            leader = standby
            say(f"take-over {t + 1}: {takeovers[-1]}")
        admin = leader.stub
        for t, over in enumerate(takeovers):
            rows.append((f"take-over {t + 1} at {over.volumes} volumes: kill → serving",
                         "serves within seconds after the lease",
                         f"{over.total:.2f} s",
                         f"lease wait {over.to_leader:.2f} s (TTL {args.lease_ttl} s), "
                         f"fence {over.to_fenced:.2f} s, load {over.to_serving:.2f} s"))

        # 5: etcd's database size.
        rows.append((f"etcd db after {args.volumes} creates (size / in use)", "bounded, stated",
                     f"{after_creates.db_size / MiB:.1f} / "
                     f"{after_creates.db_size_in_use / MiB:.1f} MiB", ""))
        samples: list[tuple[int, int, int]] = []
        started = time.monotonic()

        def sample(done: int) -> bool:
            if done % 1000 == 0:
                status = etcd_status(cluster.etcd.endpoint)
                samples.append((done, status.db_size, status.db_size_in_use))
                if done:
                    say(f"{done} cycles: etcd db {status.db_size / MiB:.1f} MiB, "
                        f"in use {status.db_size_in_use / MiB:.1f} MiB")
            return done >= total_cycles

        if total_cycles:
            with profiled(leader, args.profile, "cycles"):
                cycles = snapshot_cycles(admin, "snapB", "c", sample)
            cycled_in = time.monotonic() - started
            final = etcd_status(cluster.etcd.endpoint)
            largest = max(size for _, size, _ in samples)
            rows.append((f"etcd db after {total_cycles} snapshot create/delete cycles "
                         f"(size / in use)", "bounded, stated",
                         f"{final.db_size / MiB:.1f} / {final.db_size_in_use / MiB:.1f} MiB",
                         f"largest {largest / MiB:.1f} MiB; {cycled_in:.0f} s, CreateSnapshot "
                         f"median {ms(median(cycles.creates))}"))
        listed = len(admin.ListVolumes(admin_pb2.ListVolumesRequest()).volumes)
        assert listed == args.volumes + 2, listed

    print(f"\nMetadata at scale: {args.volumes} volumes of 1 MiB, 2 agents, lease TTL "
          f"{args.lease_ttl} s, compact every {args.compact_every:g} s; run took "
          f"{time.monotonic() - wall:.0f} s")
    print("\n| measure | goal | measured | peer, ratio, split |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if total_cycles:
        print("\netcd db during the cycles (cycles: size / in use, MiB): " + ", ".join(
            f"{n}: {s / MiB:.1f}/{u / MiB:.1f}" for n, s, u in samples))


if __name__ == "__main__":
    main()
