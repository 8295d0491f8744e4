"""A whole volkin cluster against qemu-nbd on plain files, in the same run.

    python3 -m bench.cluster [--size-mib 128] [--repeat 3]

Starts a real etcd, two agents and a controller on loopback, and qemu-nbd on
plain files beside them. Prints, each as volkin ÷ reference for the same bytes:

- NBD sequential write and read (nbdcopy, 1 MiB requests) of a volume vs a
  qemu-nbd export of a raw file;
- the background copy of a refresh (V2 from V1, across agents, S2 present),
  from StartRefresh to the job's end, vs nbdcopy between two qemu-nbd exports
  and vs `cp` of the raw file;
- the time StartRefresh and CreateSnapshot take for 1 GiB and 1 TiB volumes (the
  "instant" claim end to end: one etcd transaction, whatever the size).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.loopback import Loopback
from tests.support.etcd import free_port
from volkin.api.v1 import admin_pb2

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def best(repeat: int, job: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        job()
        times.append(time.perf_counter() - start)
    return min(times)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=600)


class QemuNbd:
    def __init__(self, image: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-x", "img", "-p", str(self.port), "-b", "127.0.0.1",
             "--persistent", "--shared=4", "--cache=writeback", str(image)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"nbd://127.0.0.1:{self.port}/img"
        for _ in range(100):
            if subprocess.run(["nbdinfo", "--size", self.url], capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("qemu-nbd did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * MiB
    cluster = Loopback()
    work = cluster.work
    peers: list[QemuNbd] = []
    try:
        controller = cluster.start()
        admin = controller.stub
        source = work / "random.raw"
        source.write_bytes(os.urandom(size))
        rows: list[tuple[str, float, float, str]] = []

        # -- NBD sequential I/O ------------------------------------------------------
        admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="V1", size_bytes=size))
        admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="V2", size_bytes=size))
        plain = work / "plain.raw"
        plain.write_bytes(b"")
        os.truncate(plain, size)
        peer = QemuNbd(plain)
        peers.append(peer)
        volkin_v1 = f"nbd://{controller.nbd}/V1"
        volkin_write = best(args.repeat, lambda: run("nbdcopy", "--request-size=1048576",
                                                     str(source), volkin_v1))
        peer_write = best(args.repeat, lambda: run("nbdcopy", "--request-size=1048576",
                                                   str(source), peer.url))
        rows.append(("NBD sequential write (nbdcopy)", volkin_write, peer_write, "qemu-nbd"))
        volkin_read = best(args.repeat, lambda: run("nbdcopy", "--request-size=1048576",
                                                    volkin_v1, "null:"))
        peer_read = best(args.repeat, lambda: run("nbdcopy", "--request-size=1048576",
                                                  peer.url, "null:"))
        rows.append(("NBD sequential read (nbdcopy)", volkin_read, peer_read, "qemu-nbd"))

        # -- the background copy of a refresh --------------------------------------------
        copies = []
        for i in range(args.repeat):
            # A fresh, unrelated target each time: a full refresh, not an incremental one.
            target = f"T{i}"
            admin.CreateVolume(admin_pb2.CreateVolumeRequest(name=target, size_bytes=size))
            run("nbdcopy", "--request-size=1048576", str(source), f"nbd://{controller.nbd}/{target}")
            admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source=target, name=f"S{i}"))
            start = time.perf_counter()
            job = admin.StartRefresh(admin_pb2.StartRefreshRequest(target=target, source="V1"))
            final = job
            for update in admin.WatchJob(admin_pb2.GetJobRequest(id=job.id), timeout=600):
                final = update
            copies.append(time.perf_counter() - start)
            assert final.state == admin_pb2.JOB_STATE_DONE, final
            assert final.blocks_done == size // 65536, final
        other = work / "other.raw"
        other.write_bytes(b"")
        os.truncate(other, size)
        second = QemuNbd(other)
        peers.append(second)
        nbd_copy = best(args.repeat, lambda: run("nbdcopy", "--request-size=65536", peer.url,
                                                 second.url))
        cp_copy = best(args.repeat, lambda: shutil.copyfile(source, work / "copy.raw"))
        rows.append(("refresh background copy (64 KiB blocks)", min(copies), nbd_copy,
                     "nbdcopy qemu-nbd→qemu-nbd"))
        rows.append(("refresh background copy (64 KiB blocks)", min(copies), cp_copy, "cp"))

        print(f"Moving {args.size_mib} MiB; best of {args.repeat}; ratio = volkin MiB/s ÷ "
              f"reference MiB/s")
        print(f"  {'job':<42} {'volkin':>10} {'reference':>10} {'ratio':>6}  reference")
        for label, ours, theirs, what in rows:
            print(f"  {label:<42} {args.size_mib / ours:7.0f} MiB/s {args.size_mib / theirs:7.0f}"
                  f" MiB/s {theirs / ours:6.2f}  {what}")

        # -- instant starts ------------------------------------------------------------------
        print("\nStart cost through the admin API (median of 5, ms)")
        for label, volume_size in (("1 GiB", GiB), ("1 TiB", TiB)):
            tag = label.replace(" ", "")
            for name in (f"A{tag}", f"B{tag}"):
                admin.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=volume_size))
            snaps, refreshes = [], []
            for i in range(5):
                start = time.perf_counter()
                admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source=f"B{tag}",
                                                                     name=f"s{tag}{i}"))
                snaps.append(time.perf_counter() - start)
                start = time.perf_counter()
                job = admin.StartRefresh(admin_pb2.StartRefreshRequest(
                    target=f"B{tag}", source=f"A{tag}"))
                refreshes.append(time.perf_counter() - start)
                admin.PauseJob(admin_pb2.PauseJobRequest(id=job.id))
            print(f"  {label}: CreateSnapshot {sorted(snaps)[2] * 1000:6.1f}   "
                  f"StartRefresh {sorted(refreshes)[2] * 1000:6.1f}")
    finally:
        for peer_server in peers:
            peer_server.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
