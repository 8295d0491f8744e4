"""One test per figure of the source: the maps of Figs 3A-3F bit for bit, and every
row of the rules table (Figs 4-10) reproduced by the general planner.

Block numbers follow the source (1-based): block k of the figures is index k-1.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.engine.harness import Harness
from volkin.engine import MapEngine, Plan
from volkin.engine.plan import Commit, Copy, Read, Write
from volkin.engine.rules import RULES, render_markdown
from volkin.engine.vmview import refresh_map, vm_map

B = 8  # block size of these scenarios
N = 8  # blocks per volume, n_max


def describe(engine: MapEngine, plan: Plan) -> str:
    """A plan with volume names for memories and source-style names for bits."""
    graph = engine.graph
    by_uid = {v.uid: v.name for v in graph.volumes.values()}
    by_memory = {v.memory: v.name for v in graph.volumes.values()}

    def memory(name: str) -> str:
        base, _, spill = name.partition("~")
        return by_memory[base] + ("~spill" if spill else "")

    def bit(map_id: str, value: bool) -> str:
        kind, _, rest = map_id.partition("/")
        if kind == "modified":
            return f"M[{by_uid[int(rest.split('/')[0])]}]={int(value)}"
        node = graph.nodes[int(rest)]
        if node.spill:
            return f"{memory(node.memory)}={int(value)}"
        if node.is_ghost:
            return f"ghost {memory(node.memory)}={int(value)}"
        return f"V[{node.volume}]={int(value)}"

    out = []
    for step in plan.steps:
        if isinstance(step, Copy):
            out.append(f"copy {memory(step.source.memory)} -> {memory(step.target.memory)}")
        elif isinstance(step, Commit):
            out.append("commit " + ", ".join(bit(c.map_id, c.value) for c in step.changes))
        elif isinstance(step, Write):
            out.append(f"write {memory(step.target.memory)}" + (" (durable)" * step.durable))
        elif isinstance(step, Read):
            out.append(f"read {memory(step.source.memory)}")
    return "; ".join(out)


def fresh(*names: str) -> Harness:
    return Harness.filled(names, N, B)


def refreshing() -> Harness:
    """V1 and V2 unrelated, S2 a snapshot of V2, then V2 refreshed from V1 (Figs 3C/3D)."""
    h = fresh("V1", "V2")
    h.snapshot("V2", "S2")
    h.refresh("V2", "V1")
    return h


def _part(h: Harness, volume: str, n: int) -> Plan:
    return h.write(volume, n, 1, b"new")


def _whole(h: Harness, volume: str, n: int) -> Plan:
    return h.write(volume, n, 0, b"W" * B)


def _fig4_done(h: Harness) -> Plan:
    _part(h, "V", 0)
    return _part(h, "V", 0)


def _fig5_own(h: Harness) -> Plan:
    _part(h, "S", 0)
    return h.engine.plan_read("S", 0)


def _fig10_refreshed(h: Harness) -> Plan:
    h.background("V2", 0)
    h.snapshot("V2", "S2")
    return _part(h, "S2", 0)


def _fig10_source(h: Harness) -> Plan:
    h.snapshot("V2", "S2")
    return _part(h, "S2", 0)


def _swap() -> tuple[Harness, Plan]:
    # V2 a snapshot of V0; V0 refreshed from V4; V4 refreshed from V2 (so V4 reads
    # V0's old block); V2 refreshed from V0 and V2 made real at block 1 (so no
    # free slot is left). Now V0 needs V4's old block and V4 needs V0's.
    h = fresh("V0", "V4")
    h.snapshot("V0", "V2")
    h.refresh("V0", "V4")
    h.refresh("V4", "V2")
    h.refresh("V2", "V0")
    h.background("V2", 0)
    return h, h.background("V0", 0)


SCENARIOS: dict[str, Callable[[], tuple[Harness, Plan]]] = {
    "fig4-cow": lambda: (h := _snap(), _part(h, "V", 0)),
    "fig4-done": lambda: (h := _snap(), _fig4_done(h)),
    "fig5-own": lambda: (h := _snap(), _fig5_own(h)),
    "fig5-through": lambda: (h := _snap(), h.engine.plan_read("S", 0)),
    "fig6-cow": lambda: (h := _snap(), _part(h, "S", 0)),
    "fig6-whole": lambda: (h := _snap(), _whole(h, "S", 0)),
    "fig7-push": lambda: (h := refreshing(), h.background("V2", 3)),
    "fig7-plain": lambda: (h := _refreshing_s2_real_at_0(), h.background("V2", 0)),
    "fig8": lambda: (h := refreshing(), _part(h, "V1", 3)),
    "fig9": lambda: (h := refreshing(), _part(h, "V2", 3)),
    "fig9-whole": lambda: (h := refreshing(), _whole(h, "V2", 3)),
    "fig10-old": lambda: (h := refreshing(), _part(h, "S2", 3)),
    "fig10-refreshed": lambda: (h := _refreshing_without_s2(), _fig10_refreshed(h)),
    "fig10-source": lambda: (h := _refreshing_without_s2(), _fig10_source(h)),
    "read-v2": lambda: (h := refreshing(), h.engine.plan_read("V2", 3)),
    "swap": _swap,
}


def _snap() -> Harness:
    h = fresh("V")
    h.snapshot("V", "S")
    return h


def _refreshing_without_s2() -> Harness:
    h = fresh("V1", "V2")
    h.refresh("V2", "V1")
    return h


def _refreshing_s2_real_at_0() -> Harness:
    h = fresh("V1", "V2")
    h.snapshot("V2", "S2")
    h.background("S2", 0)
    h.refresh("V2", "V1")
    return h


def test_every_rule_has_a_scenario() -> None:
    assert {rule.id for rule in RULES} == set(SCENARIOS)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_rule_row_is_what_the_planner_does(rule: object) -> None:
    from volkin.engine.rules import Rule

    assert isinstance(rule, Rule)
    harness, plan = SCENARIOS[rule.id]()
    assert describe(harness.engine, plan) == rule.plan
    # Whatever the plan did, every volume still reads what the model says.
    harness.check_all()


def test_docs_render_the_rules_table() -> None:
    with open("docs/map-engine.md", encoding="utf-8") as doc:
        assert render_markdown() in doc.read()


# -- Figs 3A-3F: the maps, bit for bit --------------------------------------------
def bits(s: str) -> list[int]:
    return [int(c) for c in s]


def test_fig3a_snapshot_creation_sets_v_of_primary_and_clears_everything_of_s2() -> None:
    h = fresh("V2")
    h.snapshot("V2", "S2")
    assert vm_map(h.engine, "V2") == (bits("11111111"), bits("00000000"))
    assert vm_map(h.engine, "S2") == (bits("00000000"), bits("00000000"))


def fig3b() -> Harness:
    h = fresh("V1", "V2")
    h.snapshot("V2", "S2")
    h.write("V2", 0, 0, b"a" * B)  # block 1 of memory 24 (Fig 4)
    h.write("S2", 1, 2, b"b")  # block 2 of memory 26 (Fig 6)
    h.background("S2", 2)  # background copy of block 3 to memory 26
    return h


def test_fig3b_writes_and_a_background_copy_mark_v_and_m() -> None:
    h = fig3b()
    assert vm_map(h.engine, "V2") == (bits("11111111"), bits("10000000"))
    assert vm_map(h.engine, "S2") == (bits("11100000"), bits("01000000"))


def test_fig3c_refresh_start_creates_v1_map_and_an_all_ones_refresh_map() -> None:
    h = fig3b()
    h.refresh("V2", "V1")
    assert vm_map(h.engine, "V1") == (bits("11111111"), bits("00000000"))
    assert refresh_map(h.engine, "V2") == bits("11111111")
    h.check_all()


def test_fig3d_refresh_start_clears_v_of_v2_and_sets_its_m_to_not_v_of_s2() -> None:
    h = fig3b()
    h.refresh("V2", "V1")
    v_s2, _ = vm_map(h.engine, "S2")
    assert v_s2 == bits("11100000")
    assert vm_map(h.engine, "V2") == (bits("00000000"), [1 - v for v in v_s2])
    h.check_all()


def test_fig3e_refreshing_block_1_sets_its_v_and_clears_its_r() -> None:
    h = fig3b()
    h.refresh("V2", "V1")
    h.background("V2", 0)
    assert vm_map(h.engine, "V2") == (bits("10000000"), bits("00011111"))
    assert refresh_map(h.engine, "V2") == bits("01111111")
    h.check_all()


def test_fig3f_writes_to_v1_v2_and_s2_during_the_refresh() -> None:
    h = fig3b()
    h.refresh("V2", "V1")
    h.background("V2", 0)
    h.write("V1", 1, 0, b"c" * 3)  # block 2 of memory 20 (Fig 8)
    h.write("V1", 3, 0, b"d" * 3)  # block 4 of memory 20 (Fig 8)
    h.write("V2", 4, 0, b"e" * 3)  # block 5 of memory 24 (Fig 9)
    h.write("S2", 5, 0, b"f" * 3)  # block 6 of memory 26 (Fig 10)
    assert vm_map(h.engine, "V1") == (bits("11111111"), bits("01010000"))
    assert vm_map(h.engine, "V2") == (bits("11011000"), bits("00001011"))
    assert vm_map(h.engine, "S2") == (bits("11111100"), bits("01000100"))
    assert refresh_map(h.engine, "V2") == bits("00100111")
    h.check_all()
