"""Benchmark of the map engine (never a timed test): decision cost, map memory, O(1) starts.

    python3 -m bench.engine [--quick]

Prints three tables:

1. decision cost per operation (plan + apply, no data moved), in microseconds and as a
   ratio to the peer cost of moving one 64 KiB block in memory (`bytes` copy), the least
   any data path pays per block;
2. map memory of a 1 TiB volume (64 KiB blocks) with a snapshot after 1% of its blocks
   were written, scattered and sequential, against a flat bitmap of the same maps;
3. snapshot and refresh start cost for 1 GiB and 1 TiB volumes, and their ratio (~1: O(1)).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable

from volkin.engine import Commit, MapEngine, Plan
from volkin.engine.persist import dump

BLOCK = 64 * 1024
TIB_BLOCKS = (1 << 40) // BLOCK
GIB_BLOCKS = (1 << 30) // BLOCK


def apply_commits(engine: MapEngine, plan: Plan) -> None:
    for step in plan.steps:
        if isinstance(step, Commit):
            engine.apply(step)


def per_op_us(fn: Callable[[int], object], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - start) / count * 1e6


def first_writes(engine: MapEngine) -> Callable[[int], None]:
    def write(i: int) -> None:
        apply_commits(engine, engine.plan_write("v", i))

    return write


def refreshing_engine(blocks: int) -> MapEngine:
    engine = MapEngine()
    engine.create_volume("v1", blocks, BLOCK)
    engine.create_volume("v2", blocks, BLOCK)
    engine.create_snapshot("v2", "s2")
    engine.start_refresh("v2", "v1")
    return engine


def decision_costs(count: int) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []

    plain = MapEngine()
    plain.create_volume("v", TIB_BLOCKS, BLOCK)
    for i in range(count):
        apply_commits(plain, plain.plan_write("v", i))
    rows.append(("write, block already written (fast path)",
                 per_op_us(lambda i: plain.plan_write("v", i), count)))
    rows.append(("read of a primary", per_op_us(lambda i: plain.plan_read("v", i), count)))

    for snapshots in (1, 20):
        snap = MapEngine()
        snap.create_volume("v", TIB_BLOCKS, BLOCK)
        for i in range(snapshots):
            snap.create_snapshot("v", f"s{i}")
        rows.append((f"write, first after snapshot, {snapshots} snapshot(s) (Fig 4)",
                     per_op_us(first_writes(snap), count)))
    rows.append(("read of the oldest of 20 snapshots (Fig 5)",
                 per_op_us(lambda i: snap.plan_read("s0", count + i), count)))

    engine = refreshing_engine(TIB_BLOCKS)
    rows.append(("background step with push to S2 (Fig 7)",
                 per_op_us(lambda i: apply_commits(engine, engine.plan_background("v2", i)),
                           count)))
    base = 2 * count
    rows.append(("write V1 during refresh (Fig 8)",
                 per_op_us(lambda i: apply_commits(engine, engine.plan_write("v1", base + i)),
                           count)))
    base = 3 * count
    rows.append(("write V2 during refresh (Fig 9)",
                 per_op_us(lambda i: apply_commits(engine, engine.plan_write("v2", base + i)),
                           count)))
    base = 4 * count
    rows.append(("write S2 during refresh (Fig 10)",
                 per_op_us(lambda i: apply_commits(engine, engine.plan_write("s2", base + i)),
                           count)))
    return rows


def block_copy_us(count: int) -> float:
    source = bytearray(random.randbytes(BLOCK))
    target = bytearray(BLOCK)

    def copy(_: int) -> None:
        target[:] = source

    return per_op_us(copy, count)


def map_memory(fraction: float, scattered: bool) -> tuple[int, int, int]:
    """Returns (stored segment bytes, Python heap bytes of the engine, flat bitmap bytes)."""
    written = int(TIB_BLOCKS * fraction)
    rng = random.Random(1)
    blocks = rng.sample(range(TIB_BLOCKS), written) if scattered else range(written)
    tracemalloc.start()  # after drawing the block numbers: only the engine is measured
    engine = MapEngine()
    engine.create_volume("v", TIB_BLOCKS, BLOCK)
    engine.create_snapshot("v", "s")
    for n in blocks:
        apply_commits(engine, engine.plan_write("v", n, whole_block=True))
    heap, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stored = sum(len(data) for data in dump(engine).segments.values())
    maps = len(engine.graph.maps)
    return stored, heap, maps * TIB_BLOCKS // 8


def start_costs(reps: int) -> list[tuple[str, float, float]]:
    rows = []
    operations: tuple[tuple[str, Callable[[MapEngine], object]], ...] = (
        ("snapshot", lambda e: e.create_snapshot("v1", f"s{len(e.graph.volumes)}")),
        ("refresh (unrelated, S2 present)", lambda e: e.start_refresh("v2", "v1")),
    )
    for label, make in operations:
        timings = []
        for blocks in (GIB_BLOCKS, TIB_BLOCKS):
            samples = []
            for _ in range(reps):
                engine = MapEngine()
                engine.create_volume("v1", blocks, BLOCK)
                engine.create_volume("v2", blocks, BLOCK)
                engine.create_snapshot("v2", "s2")
                start = time.perf_counter()
                make(engine)
                samples.append(time.perf_counter() - start)
            timings.append(statistics.median(samples) * 1e6)
        rows.append((label, timings[0], timings[1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations")
    args = parser.parse_args()
    count = 2000 if args.quick else 20000

    copy_us = block_copy_us(count)
    print(f"1. decision cost per operation ({count} ops each; peer: copying one 64 KiB block "
          f"in memory = {copy_us:.1f} us)")
    print(f"   {'operation':<52} {'us/op':>8} {'x block copy':>13}")
    for label, us in decision_costs(count):
        print(f"   {label:<52} {us:8.1f} {us / copy_us:13.2f}")

    print("\n2. map memory, 1 TiB volume of 64 KiB blocks with one snapshot, 1% of blocks written")
    print(f"   {'pattern':<12} {'stored segments':>16} {'python heap':>12} {'flat bitmaps':>13}"
          f" {'stored/flat':>12}")
    for scattered in (False, True):
        stored, heap, flat = map_memory(0.01, scattered)
        print(f"   {'scattered' if scattered else 'sequential':<12} {stored / 2**20:13.2f} MiB"
              f" {heap / 2**20:8.2f} MiB {flat / 2**20:9.2f} MiB {stored / flat:12.3f}")

    reps = 50 if args.quick else 1000
    print(f"\n3. start cost, median of {reps} (us)")
    print(f"   {'operation':<34} {'1 GiB':>9} {'1 TiB':>9} {'TiB/GiB':>8}")
    for label, gib, tib in start_costs(reps):
        print(f"   {label:<34} {gib:9.1f} {tib:9.1f} {tib / gib:8.2f}")


if __name__ == "__main__":
    main()
