"""Behaviour of the map engine beyond the figures: cost, incremental refresh, restore,
deletion, persistence, errors and purity."""

from __future__ import annotations

import ast
import pathlib
import sys
from collections.abc import Callable

import pytest

from tests.engine.harness import Divergence, Harness
from volkin.engine import (
    Conflict,
    Copy,
    EngineError,
    InvalidRequest,
    MapEngine,
    VolumeExists,
    VolumeNotFound,
)
from volkin.engine.persist import dump, load
from volkin.engine.planner import PlanBuilder
from volkin.engine.vmview import vm_map

B = 8


def filled(names: tuple[str, ...], blocks: int = 6) -> Harness:
    return Harness.filled(names, blocks, B)


def finish(h: Harness, name: str) -> int:
    return h.finish(name)


# -- cost -------------------------------------------------------------------------
def test_snapshot_and_refresh_of_a_terabyte_volume_write_no_map_segments() -> None:
    engine = MapEngine()
    blocks = (1 << 40) // 65536
    engine.create_volume("v1", blocks, 65536)
    engine.create_volume("v2", blocks, 65536)
    engine.create_snapshot("v2", "s2")
    before = len(dump(engine).segments)
    engine.create_snapshot("v1", "s1")
    started = engine.start_refresh("v2", "v1")
    assert len(dump(engine).segments) == before == 0
    assert started.blocks_to_copy == blocks and not started.incremental


def test_a_write_copies_its_block_once_however_many_snapshots_exist() -> None:
    h = filled(("v",))
    for i in range(10):
        h.snapshot("v", f"s{i}")
    plan = h.write("v", 2, 0, b"x")
    assert len(plan.copies) == 1
    assert plan.copies[0].target.memory == h.engine.volume("s9").memory  # the newest
    h.check_all()


def test_writing_a_whole_block_copies_nothing() -> None:
    h = filled(("v1", "v2"))
    h.refresh("v2", "v1")
    plan = h.write("v2", 0, 0, b"W" * B)
    assert plan.copies == ()
    h.check_all()


def test_a_second_write_to_a_block_needs_no_commit() -> None:
    h = filled(("v",))
    h.snapshot("v", "s")
    h.write("v", 1, 0, b"a")
    plan = h.write("v", 1, 2, b"b")
    assert [type(s).__name__ for s in plan.steps] == ["Write"]


# -- incremental refresh and restore -------------------------------------------------
def test_refreshing_again_copies_only_blocks_modified_on_either_side() -> None:
    h = filled(("v1", "v2"))
    h.refresh("v2", "v1")
    finish(h, "v2")
    h.write("v1", 1, 0, b"one")
    h.write("v2", 4, 0, b"four")
    started = h.engine.start_refresh("v2", "v1")
    h.model.refresh("v2", "v1")
    assert started.incremental
    assert started.blocks_to_copy == 2
    assert finish(h, "v2") == 2
    h.check_all()


def test_restore_from_a_snapshot_copies_only_what_changed_since_the_snapshot() -> None:
    h = filled(("v",))
    h.snapshot("v", "s")
    h.write("v", 0, 0, b"changed")
    h.write("v", 3, 0, b"changed")
    h.write("s", 5, 0, b"s too")
    started = h.engine.start_refresh("v", "s")
    h.model.refresh("v", "s")
    assert started.incremental and started.blocks_to_copy == 3
    h.check_all()
    finish(h, "v")
    h.check_all()


def test_an_older_reference_point_still_sees_a_later_refresh() -> None:
    # v2 <- v1, then v2 <- v3 replaces everything; refreshing v2 from v1 again must
    # not trust the first reference point as if nothing had happened.
    h = filled(("v1", "v2", "v3"))
    h.refresh("v2", "v1")
    finish(h, "v2")
    h.refresh("v2", "v3")
    finish(h, "v2")
    started = h.engine.start_refresh("v2", "v1")
    h.model.refresh("v2", "v1")
    assert started.blocks_to_copy == 6
    finish(h, "v2")
    h.check_all()


def test_refresh_chain_v3_from_v2_from_v1_while_both_copies_run() -> None:
    h = filled(("v1", "v2", "v3"))
    h.snapshot("v2", "s2")
    h.refresh("v2", "v1")
    h.refresh("v3", "v2")
    h.write("v1", 0, 0, b"v1 new")
    h.write("v2", 1, 0, b"v2 new")
    h.write("s2", 2, 0, b"s2 new")
    h.check_all()
    finish(h, "v3")
    finish(h, "v2")
    h.check_all()


def test_refresh_while_the_targets_snapshot_is_still_virtual() -> None:
    h = filled(("v1", "v2"))
    h.snapshot("v2", "s2")  # s2 holds nothing of its own yet
    h.refresh("v2", "v1")
    h.write("v2", 0, 0, b"v2")
    h.check_all()
    finish(h, "s2")
    finish(h, "v2")
    h.check_all()


def test_snapshot_taken_during_a_refresh_is_the_refreshed_contents() -> None:
    h = filled(("v1", "v2"))
    h.refresh("v2", "v1")
    h.background("v2", 1)
    h.snapshot("v2", "mid")
    h.write("v1", 2, 0, b"later")
    h.write("v2", 3, 0, b"later")
    h.check_all()
    finish(h, "v2")
    finish(h, "mid")
    h.check_all()


def test_restore_during_a_refresh_from_the_targets_own_snapshot() -> None:
    h = filled(("v1", "v2"))
    h.snapshot("v2", "s2")
    h.refresh("v2", "v1")
    h.background("v2", 0)
    h.write("v2", 1, 0, b"new")
    h.refresh("v2", "s2")  # changed our mind: back to the snapshot
    h.write("s2", 2, 0, b"s2")
    h.check_all()
    finish(h, "v2")
    h.check_all()


# -- deletion ---------------------------------------------------------------------
def test_deleting_a_volume_others_read_through_is_refused_with_the_reason() -> None:
    h = filled(("v1", "v2"))
    h.refresh("v2", "v1")
    with pytest.raises(Conflict, match="v2 still read blocks through it"):
        h.engine.delete_volume("v1")
    h.check_all()
    finish(h, "v2")
    assert h.delete("v1")
    h.check_all()


def test_deleting_a_refreshed_volume_is_refused_while_its_snapshot_needs_the_old_data() -> None:
    h = filled(("v1", "v2"))
    h.snapshot("v2", "s2")
    h.refresh("v2", "v1")
    with pytest.raises(Conflict, match="s2"):
        h.engine.delete_volume("v2")
    finish(h, "s2")
    deleted = h.engine.delete_volume("v2")
    h.model.delete("v2")
    assert h.engine.volume("v1").memory not in deleted.freed_memories
    assert any(m.startswith("v2#") for m in deleted.freed_memories)
    h.check_all()


# -- persistence ---------------------------------------------------------------------
def test_the_committed_state_round_trips_through_topology_and_segments() -> None:
    h = filled(("v1", "v2"))
    h.snapshot("v2", "s2")
    h.refresh("v2", "v1")
    h.background("v2", 2)
    h.write("s2", 4, 0, b"x")
    restored = load(dump(h.engine))
    for name in ("v1", "v2", "s2"):
        assert vm_map(restored, name) == vm_map(h.engine, name)
    h.engine = restored
    h.check_all()


# -- errors -------------------------------------------------------------------------
def test_bad_requests_are_refused_and_change_nothing() -> None:
    h = filled(("v1",))
    h.create_volume("small", 2)
    before = dump(h.engine)
    with pytest.raises(VolumeNotFound):
        h.engine.plan_write("nope", 0)
    with pytest.raises(InvalidRequest, match="outside volume"):
        h.engine.plan_read("v1", 6)
    with pytest.raises(VolumeExists):
        h.engine.create_snapshot("v1", "small")
    with pytest.raises(InvalidRequest, match="itself"):
        h.engine.start_refresh("v1", "v1")
    with pytest.raises(Conflict, match="sizes differ"):
        h.engine.start_refresh("small", "v1")
    with pytest.raises(InvalidRequest, match="invalid volume name"):
        h.engine.create_volume("a/b", 4, B)
    with pytest.raises(InvalidRequest, match="at least one block"):
        h.engine.create_volume("empty", 0, B)
    after = dump(h.engine)
    assert (after.topology, after.segments) == (before.topology, before.segments)


# -- the oracle can fail ---------------------------------------------------------------
def test_the_oracle_catches_a_planner_that_skips_the_push_to_s2(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_readers(self: PlanBuilder, node: object, depth: int = 0) -> list[object]:
        return []

    h = filled(("v1", "v2"))
    h.snapshot("v2", "s2")
    h.refresh("v2", "v1")
    monkeypatch.setattr(PlanBuilder, "readers_through", no_readers)
    with pytest.raises(Divergence):
        h.background("v2", 0)


def test_the_oracle_catches_a_commit_moved_before_its_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    original = PlanBuilder.plan

    def commit_first(self: PlanBuilder):  # type: ignore[no-untyped-def]
        plan = original(self)
        steps = list(plan.steps)
        for i, step in enumerate(steps[:-1]):
            if isinstance(step, Copy):
                steps[i], steps[i + 1] = steps[i + 1], steps[i]
                break
        return type(plan)(plan.unit, tuple(steps))

    h = filled(("v1", "v2"))
    h.snapshot("v2", "s2")
    h.refresh("v2", "v1")
    monkeypatch.setattr(PlanBuilder, "plan", commit_first)
    with pytest.raises(Divergence):
        h.background("v2", 0)


# -- purity ---------------------------------------------------------------------------
def test_the_engine_imports_nothing_but_the_standard_library_and_itself() -> None:
    allowed = {"__future__", "collections", "dataclasses", "enum", "typing"}
    forbidden_anywhere = {"grpc", "etcd3", "socket", "os", "io", "threading", "time", "random"}
    for path in pathlib.Path("volkin/engine").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in forbidden_anywhere, f"{path} imports {name}"
                assert name.startswith("volkin.engine") or name == "volkin.errors" or (
                    top in allowed), f"{path} imports {name}"
                assert top in sys.stdlib_module_names or top == "volkin", name
    shared = ast.parse(pathlib.Path("volkin/errors.py").read_text(encoding="utf-8"))
    imports = [n for n in ast.walk(shared) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in imports)


def test_engine_errors_map_to_grpc_status_codes_in_the_one_table() -> None:
    import grpc

    from volkin.rpc_status import status_of

    engine = MapEngine()
    engine.create_volume("v", 4, 512)
    engine.create_volume("w", 8, 512)
    cases: list[tuple[Callable[[], object], grpc.StatusCode]] = [
        (lambda: engine.plan_read("nope", 0), grpc.StatusCode.NOT_FOUND),
        (lambda: engine.create_volume("v", 4, 512), grpc.StatusCode.ALREADY_EXISTS),
        (lambda: engine.plan_read("v", 9), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: engine.start_refresh("w", "v"), grpc.StatusCode.FAILED_PRECONDITION),
    ]
    for call, code in cases:
        with pytest.raises(EngineError) as caught:
            call()
        assert status_of(caught.value) == code, caught.value


def test_modified_maps_do_not_pile_up_as_snapshots_come_and_go() -> None:
    h = filled(("v",))
    for i in range(30):
        h.snapshot("v", "s")
        h.write("v", i % 6, 0, bytes([i]))
        finish(h, "s")
        assert h.delete("s")
    assert len(h.engine.volume("v").intervals) == 1
    h.snapshot("v", "s")
    h.write("v", 2, 0, b"after")
    started = h.engine.start_refresh("v", "s")
    h.model.refresh("v", "s")
    assert started.incremental and started.blocks_to_copy == 1
    h.check_all()


# -- families: the unit of locking ------------------------------------------------------
def test_volumes_joined_by_a_snapshot_or_a_refresh_are_one_family_until_the_copy_ends() -> None:
    h = filled(("v1", "v2", "v3"))
    e = h.engine
    assert len({e.family("v1"), e.family("v2"), e.family("v3")}) == 3  # unrelated
    h.snapshot("v2", "s2")
    assert e.family("s2") == e.family("v2") != e.family("v1")
    h.refresh("v2", "v1")  # v2 now reads through v1; s2 through v2's old contents
    assert e.family("v1") == e.family("v2") == e.family("s2") != e.family("v3")
    finish(h, "v2")
    finish(h, "s2")
    assert e.family("v1") != e.family("v2")  # independent again
    assert e.family("v3") not in (e.family("v1"), e.family("v2"))
    h.check_all()


def test_a_family_outlives_a_deleted_member_only_while_something_reads_through() -> None:
    h = filled(("v1",))
    h.snapshot("v1", "s1")
    family = h.engine.family("v1")
    assert h.engine.family("s1") == family
    finish(h, "s1")  # s1 real: nothing joins them any more
    assert h.engine.family("s1") != h.engine.family("v1")
    assert h.delete("v1")
    with pytest.raises(VolumeNotFound):
        h.engine.family("v1")


# -- resize (grow only) ----------------------------------------------------------------
def test_a_grown_volume_keeps_its_blocks_and_reads_zeros_in_the_new_ones() -> None:
    h = filled(("v",), blocks=4)
    assert h.resize("v", 9)
    assert h.engine.info("v").size_blocks == 9
    assert [h.read("v", n) for n in range(4, 9)] == [bytes(B)] * 5
    h.write("v", 8, 0, b"e" * B)
    h.restart()
    h.check_all()
    assert h.read("v", 8) == b"e" * B


def test_growing_a_volume_writes_its_records_and_no_segment_for_new_blocks() -> None:
    engine = MapEngine()
    engine.create_volume("v", 3, B)
    engine.take_changes()
    engine.resize_volume("v", (1 << 40) // 65536)
    changes = engine.take_changes()
    assert changes.records[("volume", "v")]["size_blocks"] == (1 << 40) // 65536  # type: ignore[index]
    # The maps are rewritten with their new size, and all-default still: no segment.
    assert changes.maps and all(segments == () for segments in changes.maps.values())


def test_resizing_to_the_same_size_changes_nothing() -> None:
    engine = MapEngine()
    engine.create_volume("v", 3, B)
    engine.take_changes()
    assert engine.resize_volume("v", 3).size_blocks == 3
    assert not engine.take_changes()


def test_a_volume_never_shrinks() -> None:
    h = filled(("v",), blocks=4)
    with pytest.raises(InvalidRequest, match="volumes only grow"):
        h.engine.resize_volume("v", 3)
    h.check_all()


def test_a_volume_with_a_virtual_snapshot_cannot_grow_until_the_snapshot_is_real() -> None:
    h = filled(("v",), blocks=4)
    h.snapshot("v", "s1")
    with pytest.raises(Conflict, match="s1 still read blocks through it; materialize s1"):
        h.engine.resize_volume("v", 8)
    assert not h.resize("v", 8)  # and nothing changed (the harness checks)
    with pytest.raises(Conflict, match="volkin snapshot materialize s1"):
        h.engine.resize_volume("s1", 8)
    h.finish("s1")
    assert h.resize("v", 8) and h.resize("s1", 6)
    h.write("v", 7, 0, b"n" * B)
    h.check_all()


def test_neither_side_of_a_refresh_in_progress_can_grow() -> None:
    h = filled(("v1", "v2"), blocks=4)
    h.refresh("v2", "v1")
    with pytest.raises(Conflict, match="v2 still read blocks through it"):
        h.engine.resize_volume("v1", 8)
    with pytest.raises(Conflict, match="wait for its refresh to finish"):
        h.engine.resize_volume("v2", 8)
    h.finish("v2")
    assert h.resize("v2", 8)
    h.check_all()


def test_a_refresh_target_whose_snapshot_reads_its_old_contents_cannot_grow() -> None:
    h = filled(("v1", "v2"), blocks=4)
    h.snapshot("v2", "s2")
    h.refresh("v2", "v1")
    h.finish("v2")
    with pytest.raises(Conflict, match="s2 still read blocks through it"):
        h.engine.resize_volume("v2", 8)


def test_an_incremental_refresh_after_both_grew_copies_what_was_written_in_the_new_blocks(
        ) -> None:
    h = filled(("v",), blocks=4)
    h.snapshot("v", "s")
    h.finish("s")
    assert h.resize("v", 6) and h.resize("s", 6)
    h.write("v", 5, 0, b"w" * B)
    h.refresh("s", "v")
    assert h.engine.info("s").source == "v"
    assert list(h.engine.blocks_to_copy("s")) == [5]
    h.finish("s")
    h.check_all()
