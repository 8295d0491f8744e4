"""Segmented bitmaps: one bit per block, stored as fixed-size segments with a default.

A segment that has never been written takes the map's default, so a map of a
1 TiB volume that is all ones or all zeros costs a few bytes, and a map grows
with the blocks that differ from its default, not with the volume. The
controller stores each segment under its own etcd key; an absent key means
"default", which is what lets a snapshot or a refresh start in O(1).

A segment whose bits all return to the default is dropped again, so
`segments()` yields exactly the segments that must be stored.
"""

from __future__ import annotations

from collections.abc import Iterator

# 32768 bits = 4 KiB per segment: small enough for one etcd value, large enough
# that a 1 TiB volume of 64 KiB blocks needs only 512 segments when fully dense.
SEGMENT_BITS = 32768
SEGMENT_BYTES = SEGMENT_BITS // 8


class SegmentedBitmap:
    """A bitmap of `size` bits whose absent segments read as `default`."""

    __slots__ = ("_ones_in_segment", "_segments", "default", "size")

    def __init__(self, size: int, default: bool = False) -> None:
        if size < 0:
            raise ValueError(f"bitmap size must be >= 0, got {size}")
        self.size = size
        self.default = default
        # Segment index -> the segment's bits as an int (bit i = block seg*SEGMENT_BITS + i).
        self._segments: dict[int, int] = {}
        self._ones_in_segment: dict[int, int] = {}

    # -- single bits -------------------------------------------------------
    def get(self, n: int) -> bool:
        self._check(n)
        seg, bit = divmod(n, SEGMENT_BITS)
        bits = self._segments.get(seg)
        if bits is None:
            return self.default
        return bool((bits >> bit) & 1)

    def set(self, n: int, value: bool) -> None:
        self._check(n)
        seg, bit = divmod(n, SEGMENT_BITS)
        bits = self._segments.get(seg)
        if bits is None:
            if value == self.default:
                return
            bits = self._default_segment(seg)
            self._ones_in_segment[seg] = bits.bit_count()
        elif bool((bits >> bit) & 1) == value:
            return
        # One bit flips: keep the segment's count by arithmetic, not by a popcount.
        if value:
            bits |= 1 << bit
            self._ones_in_segment[seg] += 1
        else:
            bits &= ~(1 << bit)
            self._ones_in_segment[seg] -= 1
        if bits == self._default_segment(seg):
            del self._segments[seg]
            del self._ones_in_segment[seg]
        else:
            self._segments[seg] = bits

    # -- whole-map queries -------------------------------------------------
    def count(self) -> int:
        """Number of set bits."""
        total = sum(self._ones_in_segment.values())
        if self.default:
            for seg in range(self.segment_count()):
                if seg not in self._segments:
                    total += self._segment_len(seg)
        return total

    def all(self) -> bool:
        return self.count() == self.size

    def any(self) -> bool:
        return self.count() > 0

    # -- runs of bits (segment-wise: a run over absent segments costs nothing) --
    def uniform(self, start: int, stop: int) -> bool | None:
        """The value of every bit in [start, stop) if they are all equal, else None."""
        if not 0 <= start < stop <= self.size:
            raise IndexError(f"bits [{start}, {stop}) are not inside 0..{self.size}")
        value: bool | None = None
        for seg, low, high in self._spans(start, stop):
            bits = self._segments.get(seg)
            if bits is None:
                here: bool | None = self.default
            else:
                mask = ((1 << (high - low)) - 1) << low
                part = bits & mask
                here = True if part == mask else False if part == 0 else None
            if here is None or (value is not None and here != value):
                return None
            value = here
        return value

    def set_range(self, start: int, stop: int, value: bool) -> None:
        """Sets every bit in [start, stop) to `value`."""
        if not 0 <= start <= stop <= self.size:
            raise IndexError(f"bits [{start}, {stop}) are not inside 0..{self.size}")
        for seg, low, high in self._spans(start, stop):
            bits = self._segments.get(seg, self._default_segment(seg))
            mask = ((1 << (high - low)) - 1) << low
            self._store(seg, bits | mask if value else bits & ~mask)

    def _spans(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(segment, first bit, end bit) inside each segment that [start, stop) touches."""
        for seg in range(start // SEGMENT_BITS, -(-stop // SEGMENT_BITS)):
            base = seg * SEGMENT_BITS
            yield seg, max(start, base) - base, min(stop, base + SEGMENT_BITS) - base

    def iter_ones(self, start: int = 0) -> Iterator[int]:
        """Yields the set bits from `start` on, in order, skipping default-zero segments."""
        first = max(start, 0) // SEGMENT_BITS
        for seg in range(first, self.segment_count()):
            bits = self._segments.get(seg)
            base = seg * SEGMENT_BITS
            if bits is None:
                if not self.default:
                    continue
                yield from range(max(base, start), base + self._segment_len(seg))
                continue
            while bits:
                low = bits & -bits
                n = base + low.bit_length() - 1
                if n >= start:
                    yield n
                bits ^= low

    def iter_zeros(self, start: int = 0) -> Iterator[int]:
        """Yields the clear bits from `start` on, in order, skipping default-one segments."""
        inverse = self.copy()
        inverse.invert()
        return inverse.iter_ones(start)

    # -- whole-map operations (segment-wise, never bit by bit) --------------
    def copy(self) -> SegmentedBitmap:
        other = SegmentedBitmap(self.size, self.default)
        other._segments = dict(self._segments)
        other._ones_in_segment = dict(self._ones_in_segment)
        return other

    def invert(self) -> None:
        self.default = not self.default
        for seg, bits in list(self._segments.items()):
            self._store(seg, ~bits & self._full(seg))

    def combine(self, other: SegmentedBitmap, op: str) -> SegmentedBitmap:
        """A new bitmap `self OP other` for op in {'and', 'or', 'andnot'}, segment by segment."""
        if other.size != self.size:
            raise ValueError(f"bitmap sizes differ: {self.size} and {other.size}")
        result = SegmentedBitmap(self.size, _bool_op(op, self.default, other.default))
        for seg in set(self._segments) | set(other._segments):
            a = self._segments.get(seg, self._default_segment(seg))
            b = other._segments.get(seg, other._default_segment(seg))
            result._store(seg, _int_op(op, a, b) & self._full(seg))
        return result

    def grown(self, size: int, value: bool) -> SegmentedBitmap:
        """A copy of `size` bits (at least this one's): the same bits, and `value` in
        the new ones. Segment-wise; new bits equal to the default cost nothing."""
        if size < self.size:
            raise ValueError(f"a bitmap only grows: {size} < {self.size}")
        other = SegmentedBitmap(size, self.default)
        other._segments = dict(self._segments)
        other._ones_in_segment = dict(self._ones_in_segment)
        # The old last segment, if partial and stored, has zeros above the old size:
        # set_range gives them `value` (and drops a segment that became the default).
        other.set_range(self.size, size, value)
        return other

    # -- serialisation, one segment at a time --------------------------------
    def segment_count(self) -> int:
        return -(-self.size // SEGMENT_BITS)

    def segments(self) -> Iterator[tuple[int, bytes]]:
        """The segments that differ from the default, as (index, little-endian bytes)."""
        for seg in sorted(self._segments):
            yield seg, self.segment_bytes(seg)

    def segment_bytes(self, seg: int) -> bytes:
        bits = self._segments.get(seg, self._default_segment(seg))
        return bits.to_bytes(SEGMENT_BYTES, "little")

    def load_segment(self, seg: int, data: bytes) -> None:
        if not 0 <= seg < self.segment_count():
            raise ValueError(f"segment {seg} out of range 0..{self.segment_count() - 1}")
        if len(data) != SEGMENT_BYTES:
            raise ValueError(f"segment must be {SEGMENT_BYTES} bytes, got {len(data)}")
        self._store(seg, int.from_bytes(data, "little") & self._full(seg))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SegmentedBitmap) or other.size != self.size:
            return NotImplemented
        return all(
            self.segment_bytes(seg) == other.segment_bytes(seg)
            for seg in range(self.segment_count())
        )

    def __repr__(self) -> str:
        return (f"SegmentedBitmap(size={self.size}, default={int(self.default)}, "
                f"stored_segments={len(self._segments)})")

    def stored_segments(self) -> int:
        return len(self._segments)

    # -- internals -----------------------------------------------------------
    def _check(self, n: int) -> None:
        if not 0 <= n < self.size:
            raise IndexError(f"block {n} out of range 0..{self.size - 1}")

    def _segment_len(self, seg: int) -> int:
        return min(SEGMENT_BITS, self.size - seg * SEGMENT_BITS)

    def _full(self, seg: int) -> int:
        return (1 << self._segment_len(seg)) - 1

    def _default_segment(self, seg: int) -> int:
        return self._full(seg) if self.default else 0

    def _store(self, seg: int, bits: int) -> None:
        if bits == self._default_segment(seg):
            self._segments.pop(seg, None)
            self._ones_in_segment.pop(seg, None)
        else:
            self._segments[seg] = bits
            self._ones_in_segment[seg] = bits.bit_count()


def _bool_op(op: str, a: bool, b: bool) -> bool:
    return bool(_int_op(op, int(a), int(b)) & 1)


def _int_op(op: str, a: int, b: int) -> int:
    if op == "and":
        return a & b
    if op == "or":
        return a | b
    if op == "andnot":
        return a & ~b
    raise ValueError(f"unknown bitmap operation {op!r}")
