"""Thin copies (issue 9): refresh and materialize of a sparse volume beside nbdcopy.

    python3 -m bench.thin [--size 1TiB] [--data 64MiB] [--agents 3] [--rounds 2]

A source of `--size` with `--data` written in 1 MiB pieces spread over it (and
the same bytes in a sparse raw file for the peer). Each round, interleaved:

- volkin: a fresh target volume of the same size is refreshed from the source
  (StartRefresh → the job's end in the controller's log), then a snapshot of the
  source is made real (StartMaterialize → its end); `volume show`'s allocated
  bytes of each;
- the peer: `nbdcopy --flush --destination-is-zero` from a qemu-nbd export of
  the sparse raw file to a qemu-nbd export of an empty sparse file of the same
  size (nbdcopy skips holes by the source's base:allocation block status), and
  the space the copy holds afterwards.

Prints the medians and the ratios; no threshold is asserted (a benchmark, not a
test).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import time
from pathlib import Path

from bench.datapath import (
    GiB,
    MiB,
    QemuNbd,
    _size,
    commit,
    create_volume,
    delete_volumes,
    empty_file,
    finished_at,
    machine,
    med,
    watch,
)
from bench.loopback import Loopback
from volkin.api.v1 import admin_pb2
from volkin.cli.sizes import format_size


def spread(size: int, data: int, seed: int = 7) -> list[int]:
    """Offsets of `data` bytes in 1 MiB pieces, spread over `size` (distinct, sorted)."""
    units = size // MiB
    return sorted(random.Random(seed).sample(range(units), data // MiB))


def sparse_copy(source: str, destination: str) -> None:
    """nbdcopy onto a fresh destination that reads as zeros: holes are skipped, not
    zeroed (both peers are fresh, so both get this)."""
    subprocess.run(["nbdcopy", "--flush", "--destination-is-zero", source, destination],
                   check=True, capture_output=True, timeout=3600)


def fill(image: Path, offsets: list[int], uri: str) -> None:
    """Writes the pieces into the raw file, then copies the file into the volume (only
    the pieces move)."""
    with open(image, "r+b") as out:
        for unit in offsets:
            out.seek(unit * MiB)
            out.write(os.urandom(MiB))
    sparse_copy(str(image), uri)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=_size, default=1 << 40, help="volume size (1TiB)")
    parser.add_argument("--data", type=_size, default=64 * MiB,
                        help="bytes written into the source, in 1 MiB pieces (64MiB)")
    parser.add_argument("--agents", type=int, default=3, help="agents (3)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (2)")
    args = parser.parse_args()
    size, data = args.size, args.data
    print(f"machine: {machine()}\ncommit measured: {commit()}\n", flush=True)
    started = time.monotonic()
    with Loopback(agents=args.agents) as cluster:
        controller = cluster.start()
        admin = controller.stub
        uri = f"nbd://{controller.nbd}"
        image = empty_file(cluster.work / "source.raw", size)
        create_volume(admin, "SRC", size)
        fill(image, spread(size, data), f"{uri}/SRC")
        print(f"[{time.monotonic() - started:6.1f} s] source: {format_size(data)} in "
              f"{format_size(size)}, {args.agents} agents", flush=True)
        source_peer = QemuNbd(image)
        refresh: list[float] = []
        materialize: list[float] = []
        peer: list[float] = []
        ours_allocated: list[int] = []
        snap_allocated: list[int] = []
        peer_allocated: list[int] = []
        try:
            for r in range(args.rounds):
                destination = QemuNbd(empty_file(cluster.work / "copy.raw", size))
                os.sync()
                start = time.perf_counter()
                sparse_copy(source_peer.uri, destination.uri)
                peer.append(time.perf_counter() - start)
                destination.stop()
                peer_allocated.append(allocated(destination.image))

                target = f"T{r}"
                create_volume(admin, target, size)
                os.sync()
                start_wall = time.time()
                job = admin.StartRefresh(admin_pb2.StartRefreshRequest(target=target,
                                                                       source="SRC"))
                if watch(admin, job.id).state != admin_pb2.JOB_STATE_DONE:
                    raise RuntimeError(f"the refresh of {target} did not finish")
                refresh.append(finished_at(controller.log(), job.id) - start_wall)
                ours_allocated.append(admin.GetVolume(
                    admin_pb2.GetVolumeRequest(name=target)).allocated_bytes)

                snap = f"S{r}"
                admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="SRC", name=snap))
                start_wall = time.time()
                job = admin.StartMaterialize(admin_pb2.StartMaterializeRequest(name=snap))
                if watch(admin, job.id).state != admin_pb2.JOB_STATE_DONE:
                    raise RuntimeError(f"the materialize of {snap} did not finish")
                materialize.append(finished_at(controller.log(), job.id) - start_wall)
                snap_allocated.append(admin.GetVolume(
                    admin_pb2.GetVolumeRequest(name=snap)).allocated_bytes)
                delete_volumes(admin, target, snap)
                print(f"[{time.monotonic() - started:6.1f} s] round {r + 1}: nbdcopy "
                      f"{peer[-1]:.2f} s, refresh {refresh[-1]:.2f} s, materialize "
                      f"{materialize[-1]:.2f} s", flush=True)
        finally:
            source_peer.stop()
    print(f"\nThin copies of a {format_size(size)} volume holding {format_size(data)} "
          f"(1 MiB pieces spread over it), {args.agents} agents; medians of {args.rounds} "
          f"interleaved rounds\n")
    print("| copy | time | ÷ nbdcopy's time | allocated afterwards |")
    print("|---|---|---|---|")
    base = med(peer)
    print(f"| nbdcopy, qemu-nbd → qemu-nbd | {base:.2f} s | 1.00 | "
          f"{format_size(int(med([float(a) for a in peer_allocated])))} |")
    print(f"| volkin refresh (StartRefresh → done) | {med(refresh):.2f} s | "
          f"**{med(refresh) / base:.2f}** | "
          f"{format_size(int(med([float(a) for a in ours_allocated])))} |")
    print(f"| volkin materialize (StartMaterialize → done) | {med(materialize):.2f} s | "
          f"**{med(materialize) / base:.2f}** | "
          f"{format_size(int(med([float(a) for a in snap_allocated])))} |")
    print(f"\n(data moved: {data / GiB:.3f} GiB; a block-by-block walk of the target would "
          f"have been {size // 65536:,} block copies)")


if __name__ == "__main__":
    main()
