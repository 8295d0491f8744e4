"""Segmented bitmaps: absent segments take the default, and storage follows what differs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volkin.engine.bitmap import SEGMENT_BITS, SEGMENT_BYTES, SegmentedBitmap


def test_a_fresh_map_of_a_terabyte_volume_stores_nothing() -> None:
    blocks = (1 << 40) // 4096
    ones = SegmentedBitmap(blocks, True)
    assert ones.stored_segments() == 0
    assert ones.get(blocks - 1) is True
    assert ones.count() == blocks


def test_setting_a_bit_stores_one_segment_and_clearing_it_drops_it_again() -> None:
    bitmap = SegmentedBitmap(3 * SEGMENT_BITS)
    bitmap.set(SEGMENT_BITS + 5, True)
    assert [index for index, _ in bitmap.segments()] == [1]
    bitmap.set(SEGMENT_BITS + 5, False)
    assert bitmap.stored_segments() == 0


def test_out_of_range_bits_are_refused() -> None:
    bitmap = SegmentedBitmap(10)
    with pytest.raises(IndexError):
        bitmap.get(10)
    with pytest.raises(IndexError):
        bitmap.set(-1, True)


def test_segments_round_trip_through_bytes() -> None:
    bitmap = SegmentedBitmap(2 * SEGMENT_BITS + 7, True)
    for n in (0, 9, SEGMENT_BITS, 2 * SEGMENT_BITS + 6):
        bitmap.set(n, False)
    copy = SegmentedBitmap(bitmap.size, True)
    for index, data in bitmap.segments():
        assert len(data) == SEGMENT_BYTES
        copy.load_segment(index, data)
    assert copy == bitmap
    with pytest.raises(ValueError):
        copy.load_segment(0, b"short")


@settings(max_examples=40, deadline=None)
@given(size=st.sampled_from([1, 7, SEGMENT_BITS - 1, SEGMENT_BITS, SEGMENT_BITS + 3]),
       default=st.booleans(), other_default=st.booleans(), data=st.data())
def test_whole_map_operations_agree_with_bit_by_bit_sets(size: int, default: bool,
                                                         other_default: bool,
                                                         data: st.DataObject) -> None:
    bits = st.lists(st.integers(0, size - 1), max_size=20)
    a, b = SegmentedBitmap(size, default), SegmentedBitmap(size, other_default)
    for n in data.draw(bits):
        a.set(n, not default)
    for n in data.draw(bits):
        b.set(n, not other_default)
    plain_a = {n for n in range(size) if a.get(n)}
    plain_b = {n for n in range(size) if b.get(n)}
    assert set(a.iter_ones()) == plain_a and a.count() == len(plain_a)
    assert set(a.iter_zeros()) == set(range(size)) - plain_a
    assert set(a.combine(b, "or").iter_ones()) == plain_a | plain_b
    assert set(a.combine(b, "and").iter_ones()) == plain_a & plain_b
    assert set(a.combine(b, "andnot").iter_ones()) == plain_a - plain_b


@given(st.integers(1, 3 * SEGMENT_BITS), st.booleans(), st.data())
def test_runs_of_bits_agree_with_bit_by_bit(size: int, default: bool, data: st.DataObject) -> None:
    """`uniform` and `set_range` answer and act as a loop over single bits would."""
    bits = SegmentedBitmap(size, default)
    plain = [default] * size
    for _ in range(data.draw(st.integers(0, 6))):
        start = data.draw(st.integers(0, size - 1))
        stop = data.draw(st.integers(start + 1, size))
        value = data.draw(st.booleans())
        if data.draw(st.booleans()):
            bits.set_range(start, stop, value)
            plain[start:stop] = [value] * (stop - start)
        else:
            bits.set(start, value)
            plain[start] = value
        probe = data.draw(st.integers(0, size - 1))
        end = data.draw(st.integers(probe + 1, size))
        values = set(plain[probe:end])
        assert bits.uniform(probe, end) == (values.pop() if len(values) == 1 else None)
    assert [bits.get(n) for n in range(size)] == plain
    assert bits.count() == sum(plain)
    assert bits.stored_segments() == len(list(bits.segments()))
