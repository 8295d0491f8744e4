"""Stripes and extents: how a memory's bytes lie on agents (`controller.placement`)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.placement import (
    DEFAULT_UNIT,
    Layout,
    Placement,
    single_extent_record,
)
from volkin.errors import FailedPrecondition, InvalidArgument, Unavailable

KiB, MiB, TiB, PiB = 1 << 10, 1 << 20, 1 << 40, 1 << 50
BLOCK = 64 * KiB


@st.composite
def layouts_and_ranges(draw: st.DrawFn) -> tuple[Layout, int, int]:
    width = draw(st.integers(1, 5))
    unit = 4096 << draw(st.integers(0, 3))
    extent_bytes = unit * draw(st.integers(1, 4))
    size = draw(st.integers(1, 40)) * 4096
    offset = draw(st.integers(0, size - 1))
    length = draw(st.integers(0, size - offset))
    nodes = tuple(f"a{i}" for i in range(width))
    return Layout(nodes, unit, extent_bytes, size, "m7"), offset, length


@given(layouts_and_ranges())
def test_every_byte_of_a_memory_has_one_place_in_one_extent(
        case: tuple[Layout, int, int]) -> None:
    layout, offset, length = case
    places = {}
    for piece in layout.pieces(0, layout.size):
        for i in range(piece.length):
            places[piece.at + i] = (piece.extent_id, piece.offset + i)
    assert sorted(places) == list(range(layout.size))
    assert len(set(places.values())) == layout.size  # no extent byte holds two
    sizes = {spec.extent_id: spec.size_bytes for spec in layout.extents()}
    assert sum(sizes.values()) == layout.size
    for extent, at in places.values():
        assert 0 <= at < sizes[extent]
    # Any range's pieces are that range's places, in order, without gaps.
    at = 0
    for piece in layout.pieces(offset, length):
        assert piece.at == at
        assert places[offset + at] == (piece.extent_id, piece.offset)
        assert places[offset + at + piece.length - 1] == (
            piece.extent_id, piece.offset + piece.length - 1)
        at += piece.length
    assert at == length


@given(layouts_and_ranges())
def test_spans_hold_a_range_once_in_a_few_pieces_and_map_back_to_it(
        case: tuple[Layout, int, int]) -> None:
    layout, offset, length = case
    where = {}
    for piece in layout.pieces(offset, length):
        for i in range(piece.length):
            where[(piece.extent_id, piece.offset + i)] = offset + piece.at + i
    spans = layout.spans(offset, length)
    covered = [(s.extent_id, s.offset + i) for s in spans for i in range(s.length)]
    assert sorted(covered) == sorted(where)  # the same bytes, each once
    assert len(spans) <= len(layout.extents())  # one per extent at most
    back = sorted(m for s in spans for at, n in layout.memory_ranges(
        s.column, s.column_offset, s.length) for m in range(at, at + n))
    assert back == list(range(offset, offset + length))


def test_stripe_units_are_dealt_round_robin_over_the_agents() -> None:
    layout = Layout(("a1", "a2", "a3"), MiB, 8 * TiB, 8 * MiB, "m1")
    assert [p.node_id for p in layout.pieces(0, 8 * MiB)] == \
        ["a1", "a2", "a3", "a1", "a2", "a3", "a1", "a2"]
    # Unit 3 is the second unit of the first column: right after unit 0 in its extent.
    assert layout.pieces(3 * MiB + 5, 1)[0].offset == MiB + 5
    assert [s.size_bytes for s in layout.extents()] == [3 * MiB, 3 * MiB, 2 * MiB]


def test_a_column_larger_than_one_extent_is_cut_into_several() -> None:
    layout = Layout(("a1", "a2"), MiB, 4 * MiB, 20 * MiB, "m2")
    assert [(s.node_id, s.extent_id, s.size_bytes) for s in layout.extents()] == [
        ("a1", "m2-c0-e0", 4 * MiB), ("a1", "m2-c0-e1", 4 * MiB), ("a1", "m2-c0-e2", 2 * MiB),
        ("a2", "m2-c1-e0", 4 * MiB), ("a2", "m2-c1-e1", 4 * MiB), ("a2", "m2-c1-e2", 2 * MiB)]
    (last,) = layout.pieces(20 * MiB - 512, 512)
    assert (last.node_id, last.extent_id, last.offset) == ("a2", "m2-c1-e2", 2 * MiB - 512)


def test_a_one_pib_volume_on_three_agents_needs_extents_no_file_system_refuses() -> None:
    layout = Placement(["a1", "a2", "a3"]).choose("P#1", PiB, BLOCK)
    specs = layout.extents()
    assert layout.width == 3 and sum(s.size_bytes for s in specs) == PiB
    assert max(s.size_bytes for s in specs) <= 8 * TiB < 16 * TiB  # ext4's largest file
    (last,) = layout.pieces(PiB - BLOCK, BLOCK)
    assert last.offset + last.length <= 8 * TiB


def test_contiguous_pieces_in_one_extent_are_one_request() -> None:
    """Width 1: a 32 MiB request is one agent request, whatever the stripe unit."""
    layout = Layout(("a1",), MiB, 8 * TiB, 64 * MiB, "m3")
    assert len(layout.pieces(MiB // 2, 32 * MiB)) == 1
    assert [s.extent_id for s in layout.extents()] == ["m3"]  # one extent keeps its id


def test_a_record_of_the_layout_before_striping_is_one_extent_on_one_node() -> None:
    old = Layout.from_record(single_extent_record("a2", "m5"), 64 * MiB)
    assert [(s.node_id, s.extent_id, s.size_bytes) for s in old.extents()] == [
        ("a2", "m5", 64 * MiB)]
    (piece,) = old.pieces(10 * MiB, 30 * MiB)
    assert (piece.extent_id, piece.offset, piece.length) == ("m5", 10 * MiB, 30 * MiB)
    new = Layout(("a1", "a3"), 2 * MiB, 4 * TiB, 64 * MiB, "m6")
    assert Layout.from_record(new.record()) == new
    assert json.loads(new.record())["format"] == 2


def test_new_volumes_go_over_every_agent_up_to_the_default_width() -> None:
    placement = Placement([f"a{i}" for i in range(10)])
    layout = placement.choose("V#1", 64 * MiB, BLOCK)
    assert layout.width == 8 and layout.unit == DEFAULT_UNIT
    assert Placement(["a1", "a2", "a3"]).choose("V#1", 64 * MiB, BLOCK).width == 3
    # A block larger than the default unit is the unit.
    assert Placement(["a1"]).choose("V#1", 64 * MiB, 4 * MiB).unit == 4 * MiB


def test_new_volumes_start_their_stripes_on_the_next_agent_and_fill_the_emptiest() -> None:
    placement = Placement(["a1", "a2", "a3"])
    first = placement.choose("V#1", 64 * MiB, BLOCK)
    placement.place("V#1", first)
    second = placement.choose("W#2", 64 * MiB, BLOCK)
    assert first.nodes == ("a1", "a2", "a3") and second.nodes == ("a2", "a3", "a1")
    placement.place("W#2", second)
    narrow = placement.choose("X#3", 64 * MiB, BLOCK, width=1)
    placement.place("X#3", narrow)
    assert set(placement.choose("Y#4", 64 * MiB, BLOCK, width=2).nodes) == {"a2", "a3"}
    placement.forget("X#3")
    placement.update_nodes(["a1", "a2", "a3", "a4"])  # an agent joins: new volumes use it
    assert "a4" in placement.choose("Z#5", 64 * MiB, BLOCK, width=1).nodes


def test_a_snapshot_and_a_spill_memory_lie_where_their_source_lies() -> None:
    placement = Placement(["a1", "a2", "a3"])
    origin = placement.choose("V#1", 64 * MiB, BLOCK, unit=2 * MiB, width=2)
    placement.place("V#1", origin)
    snap = placement.like("S#2", "V#1")
    assert snap is not None
    spill = placement.choose("V#1~4", 64 * MiB, BLOCK)
    for layout in (snap, spill):
        assert (layout.nodes, layout.unit) == (origin.nodes, origin.unit)
    assert snap.base == "m2" and spill.base == "m1-s4"


@pytest.mark.parametrize(("unit", "width", "error", "message"), [
    (3 * MiB, 0, InvalidArgument, "power of two"),
    (32 * KiB, 0, InvalidArgument, "multiple of the block size"),
    (0, 4, FailedPrecondition, "needs 4 agents; 3 are registered"),
])
def test_a_layout_that_cannot_be_is_refused_with_the_reason(
        unit: int, width: int, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Placement(["a1", "a2", "a3"]).choose("V#1", 64 * MiB, BLOCK, unit, width)


def test_no_agent_no_volume() -> None:
    with pytest.raises(Unavailable, match="no agent is registered"):
        Placement([]).choose("V#1", 64 * MiB, BLOCK)


@given(layouts_and_ranges(), st.integers(0, 40))
def test_a_grown_layout_keeps_every_byte_in_its_place_and_only_adds_or_grows_extents(
        case: tuple[Layout, int, int], more: int) -> None:
    layout, offset, length = case
    try:
        grown = layout.grown(layout.size + more * 4096)
    except FailedPrecondition:
        assert layout.width == 1 and layout.size <= layout.extent_bytes
        return
    assert grown.pieces(offset, length) == layout.pieces(offset, length)
    before = {spec.extent_id: spec for spec in layout.extents()}
    for spec in grown.extents():
        old = before.pop(spec.extent_id, None)
        assert old is None or (old.node_id == spec.node_id
                               and old.size_bytes <= spec.size_bytes), (old, spec)
    assert not before  # no extent disappears


def test_a_layout_never_shrinks_and_one_extent_alone_cannot_split() -> None:
    layout = Layout(("a1",), MiB, 4 * MiB, 3 * MiB, "m1")
    assert layout.grown(4 * MiB).extents()[0].extent_id == "m1"
    with pytest.raises(FailedPrecondition, match="cannot grow"):
        layout.grown(5 * MiB)
    with pytest.raises(InvalidArgument, match="only grows"):
        layout.grown(2 * MiB)
