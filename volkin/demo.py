"""A walk through an instant refresh, on the map engine and in-memory memories.

    python3 -m volkin.demo [--blocks N]

V1 and V2 are unrelated volumes and S2 is a snapshot of V2. V2 is refreshed from
V1: at once it reads as V1, while S2 keeps V2's old contents. Writes to all three
volumes go on during the background copy; each prints its plan. At the end every
volume is checked against the reference model.
"""

from __future__ import annotations

import argparse

from volkin.engine import MapEngine, Plan
from volkin.engine.memstore import MemoryStore
from volkin.engine.reference import ReferenceModel
from volkin.engine.vmview import refresh_map, vm_map

BLOCK = 4


class Demo:
    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.engine = MapEngine()
        self.store = MemoryStore(BLOCK)
        self.model = ReferenceModel(BLOCK)

    def run(self, plan: Plan, data: bytes = b"", offset: int = 0) -> bytes | None:
        return self.store.run(self.engine, plan, data, offset)

    def write(self, name: str, block: int, data: bytes, say: bool = True) -> None:
        plan = self.engine.plan_write(name, block, whole_block=len(data) == BLOCK)
        self.run(plan, data)
        self.model.write(name, block, 0, data)
        if say:
            print(f"  write {name}[{block}] = {data.decode()!r}: {plan}")

    def contents(self, name: str) -> str:
        out = []
        for n in range(self.blocks):
            data = self.run(self.engine.plan_read(name, n))
            assert data is not None
            out.append(data.decode())
        return " ".join(out)

    def show(self) -> None:
        for name in ("V1", "V2", "S2"):
            v_bits, m_bits = vm_map(self.engine, name)
            line = f"  {name}: {self.contents(name)}   V={''.join(map(str, v_bits))}"
            line += f" M={''.join(map(str, m_bits))}"
            if name == "V2":
                line += f" R={''.join(map(str, refresh_map(self.engine, name)))}"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description="instant refresh, step by step")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per volume (default 8)")
    args = parser.parse_args()
    demo = Demo(max(4, args.blocks))
    engine, model = demo.engine, demo.model

    print("1. Two unrelated volumes, and a snapshot S2 of V2 (Fig 3A)")
    for name, letter in (("V1", "a"), ("V2", "x")):
        engine.create_volume(name, demo.blocks, BLOCK)
        model.create_volume(name, demo.blocks)
        for n in range(demo.blocks):
            demo.write(name, n, f"{letter}{n:03d}".encode(), say=False)
    engine.create_snapshot("V2", "S2")
    model.create_snapshot("V2", "S2")
    demo.show()

    print("\n2. Refresh V2 from V1: instant, nothing copied yet (Figs 3C, 3D)")
    started = engine.start_refresh("V2", "V1")
    model.refresh("V2", "V1")
    print(f"  {started.blocks_to_copy} blocks to copy in the background")
    demo.show()

    print("\n3. All three volumes stay writable during the copy (Figs 8, 9, 10)")
    demo.write("V1", 1, b"V1!!")
    demo.write("V2", 2, b"V2!!")
    demo.write("S2", 3, b"S2!!")
    demo.show()

    print("\n4. The background copy (Fig 7)")
    todo = list(engine.blocks_to_copy("V2"))
    for done, n in enumerate(todo, 1):
        demo.run(engine.plan_background("V2", n))
        print(f"  copied block {n}: {done}/{len(todo)} ({100 * done // len(todo)}%)")
    assert engine.detach_if_real("V2")
    demo.show()

    print("\n5. Every block of every volume against the reference model")
    for name in ("V1", "V2", "S2"):
        expected = " ".join(b.decode() for b in model.volumes[name])
        verdict = "ok" if demo.contents(name) == expected else "WRONG"
        print(f"  {name}: {verdict}")
        if verdict != "ok":
            raise SystemExit(1)


if __name__ == "__main__":
    main()
