"""Agent throughput against a plain reference doing the same job in the same run.

    python3 -m bench.agent [--size-mib 256] [--dir DIR]

Starts a real etcd and two agents on loopback. For 64 KiB and 1 MiB blocks it
measures, each as a ratio to its reference:

- write: Write calls of one block each, 8 in flight  vs  os.pwrite of the same blocks;
- read:  Read calls of one block each, 8 in flight   vs  os.pread of the same blocks;
- local copy: Copy calls (--copy-batch-mib of block-sized ranges each) between two
  extents of one agent  vs  os.copy_file_range of the same ranges between two files;
- peer copy: Copy calls pulling the same ranges from the other agent  vs  nbdcopy
  between two qemu-nbd exports of files in the two agents' data directories.

Every run moves the same bytes; each number is the best of `--repeat` runs. Data
stays in the page cache on both sides (no durability flag, no nbdcopy --flush).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import grpc

from tests.agent.conftest import Agent
from tests.support.etcd import EtcdServer, free_port
from volkin.api.v1 import agent_pb2, agent_pb2_grpc

MiB = 1 << 20
QUEUE_DEPTH = 8


def _best(repeat: int, job: Callable[[], object],
          setup: Callable[[], object] | None = None) -> float:
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        job()
        best = min(best, time.perf_counter() - start)
    return best


def _pipelined(calls: list[Callable[[], grpc.Future[object]]]) -> None:
    """Runs unary calls with QUEUE_DEPTH of them in flight."""
    in_flight: deque[grpc.Future[object]] = deque()
    for call in calls:
        if len(in_flight) >= QUEUE_DEPTH:
            in_flight.popleft().result()
        in_flight.append(call())
    for future in in_flight:
        future.result()


def _ranges(size: int, block: int, batch: int) -> list[list[agent_pb2.CopyRange]]:
    per_call = max(batch // block, 1)
    blocks = [agent_pb2.CopyRange(source_offset=o, target_offset=o, length=block)
              for o in range(0, size, block)]
    return [blocks[i:i + per_call] for i in range(0, len(blocks), per_call)]


class Bench:
    def __init__(self, root: Path, size: int, repeat: int, batch: int) -> None:
        self.root, self.size, self.repeat, self.batch = root, size, repeat, batch
        self.etcd = EtcdServer(root / "etcd")
        self.a1 = Agent("a1", root / "a1", self.etcd)
        self.a2 = Agent("a2", root / "a2", self.etcd)
        self.data = os.urandom(size)
        self.results: list[tuple[str, int, float, float]] = []

    def start(self) -> None:
        self.etcd.start()
        self.a1.start()
        self.a2.start()
        for agent, names in ((self.a1, ("src", "dst")), (self.a2, ("dst",))):
            for name in names:
                agent.stub.CreateExtent(agent_pb2.CreateExtentRequest(
                    extent_id=name, size_bytes=self.size, block_size=4096, epoch=1))

    def stop(self) -> None:
        for agent in (self.a1, self.a2):
            agent.stop()
        self.etcd.stop()

    def record(self, job: str, block: int, ours: float, reference: float) -> None:
        self.results.append((job, block, self.size / ours, self.size / reference))
        print(f"{job:<11} {block // 1024:>5} KiB  agent {self.size / ours / MiB:8.0f} MiB/s  "
              f"reference {self.size / reference / MiB:8.0f} MiB/s  ratio {reference / ours:5.2f}",
              flush=True)

    def write_and_read(self, block: int) -> None:
        stub = self.a1.stub
        view = memoryview(self.data)
        offsets = range(0, self.size, block)
        def write_call(o: int) -> Callable[[], grpc.Future[object]]:
            return lambda: stub.Write.future(agent_pb2.WriteRequest(
                extent_id="src", offset=o, data=bytes(view[o:o + block]), epoch=1))

        ours = _best(self.repeat, lambda: _pipelined([write_call(o) for o in offsets]))
        path = self.root / "reference.img"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        os.ftruncate(fd, self.size)

        def pwrite_all() -> None:
            for o in offsets:
                os.pwrite(fd, view[o:o + block], o)

        reference = _best(self.repeat, pwrite_all)
        self.record("write", block, ours, reference)

        ours = _best(self.repeat, lambda: _read_blocks(stub, offsets, block))
        reference = _best(self.repeat, lambda: [os.pread(fd, block, o) for o in offsets])
        os.close(fd)
        self.record("read", block, ours, reference)

    def local_copy(self, block: int) -> None:
        stub = self.a1.stub
        requests = [agent_pb2.CopyRequest(target_extent_id="dst", source_extent_id="src",
                                          epoch=1, ranges=b)
                    for b in _ranges(self.size, block, self.batch)]
        # A local copy of 256 MiB takes tens of milliseconds: more runs on both sides
        # keep scheduling noise out of the best time.
        repeat = 3 * self.repeat
        ours = _best(repeat, lambda: [stub.Copy(r, timeout=120) for r in requests])
        src = os.open(self.a1.data_dir / "extents" / "src.extent", os.O_RDONLY)
        dst = os.open(self.root / "reference-copy.img", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        os.ftruncate(dst, self.size)

        def copy_all() -> None:
            for o in range(0, self.size, block):
                os.copy_file_range(src, dst, block, o, o)

        reference = _best(repeat, copy_all)
        os.close(src)
        os.close(dst)
        self.record("local copy", block, ours, reference)

    def peer_copy(self, block: int) -> None:
        stub = self.a2.stub
        requests = [agent_pb2.CopyRequest(
            target_extent_id="dst", source_extent_id="src", source_agent=self.a1.address,
            epoch=1, ranges=b) for b in _ranges(self.size, block, self.batch)]
        ours = _best(self.repeat, lambda: [stub.Copy(r, timeout=120) for r in requests])
        source_file = self.a1.data_dir / "extents" / "src.extent"
        target_file = self.a2.data_dir / "nbd-target.img"
        with open(target_file, "wb") as f:
            f.truncate(self.size)
        p1, p2 = free_port(), free_port()
        pids: list[int] = []
        try:
            for port, path, extra in ((p1, source_file, ["--read-only"]), (p2, target_file, [])):
                # --fork returns once the export is listening; the pid file names the server.
                pid_file = self.root / f"qemu-nbd-{port}.pid"
                subprocess.run(["qemu-nbd", "-f", "raw", "--persistent", "--shared=16", "--fork",
                                "--pid-file", str(pid_file), "-b", "127.0.0.1", "-p", str(port),
                                *extra, str(path)], check=True)
                pids.append(int(pid_file.read_text()))
            command = ["nbdcopy", f"--request-size={block}", f"nbd://127.0.0.1:{p1}",
                       f"nbd://127.0.0.1:{p2}"]
            reference = _best(self.repeat, lambda: subprocess.run(command, check=True))
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
        if target_file.read_bytes() != source_file.read_bytes():
            raise SystemExit("nbdcopy reference did not copy the bytes")
        self.record("peer copy", block, ours, reference)

    def verify(self) -> None:
        got = b"".join(c.data for c in self.a2.stub.Read(agent_pb2.ReadRequest(
            extent_id="dst", offset=0, length=self.size)))
        if got != self.data:
            raise SystemExit("peer copy did not copy the bytes")


def _read_blocks(stub: agent_pb2_grpc.BlockStoreStub, offsets: range, block: int) -> None:
    """One Read call per block with QUEUE_DEPTH streams in flight."""

    def one(o: int) -> int:
        return sum(len(c.data) for c in stub.Read(agent_pb2.ReadRequest(
            extent_id="src", offset=o, length=block)))

    with concurrent.futures.ThreadPoolExecutor(QUEUE_DEPTH) as pool:
        total = sum(pool.map(one, offsets))
    assert total == len(offsets) * block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--copy-batch-mib", type=int, default=256,
                        help="bytes of block-sized ranges per Copy call")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    for tool in ("etcd", "qemu-nbd", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (see .ci/run for the apt packages)")
    root = args.dir or Path(tempfile.mkdtemp(prefix="volkin-bench-agent-"))
    root.mkdir(parents=True, exist_ok=True)
    bench = Bench(root, args.size_mib * MiB, args.repeat, args.copy_batch_mib * MiB)
    print(f"agent benchmark: {args.size_mib} MiB per job, best of {args.repeat}, "
          f"{args.copy_batch_mib} MiB of ranges per Copy call, in {root}", file=sys.stderr)
    try:
        bench.start()
        for block in (64 << 10, 1 << 20):
            bench.write_and_read(block)
            bench.local_copy(block)
            bench.peer_copy(block)
        bench.verify()
    finally:
        bench.stop()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
