"""What a well-formed block-store request is: limits, names, geometry, ranges, copy lists.

Every check here is pure (no files, no locks) and raises `InvalidArgument` or
`OutOfRange` with a message naming the extent and what was wrong, so the store can
refuse a bad call before it touches anything.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from volkin.errors import InvalidArgument, OutOfRange

# Largest payload of one Write (or one Read/peer-copy chunk): bigger ranges stream.
MAX_IO_BYTES = 4 << 20
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = MAX_IO_BYTES
MAX_EXTENT_BYTES = 1 << 56
_EXTENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Geometry:
    """The shape of an extent, as far as validation cares."""

    extent_id: str
    size: int
    block_size: int


@dataclass(frozen=True)
class CopyRange:
    source_offset: int
    target_offset: int
    length: int


class RangeLike(Protocol):
    """A CopyRange or its protobuf message: both name their fields alike."""

    @property
    def source_offset(self) -> int: ...
    @property
    def target_offset(self) -> int: ...
    @property
    def length(self) -> int: ...


def check_extent_id(extent_id: str) -> None:
    if not _EXTENT_ID.fullmatch(extent_id):
        raise InvalidArgument(
            f"extent id {extent_id!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")


def check_epoch(epoch: int) -> None:
    if epoch < 1:
        raise InvalidArgument("every mutating call must carry a fencing epoch >= 1")


def check_geometry(size_bytes: int, block_size: int) -> None:
    """A new extent: a power-of-two block size, a size that is a positive multiple of it."""
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or (
            block_size & (block_size - 1)):
        raise InvalidArgument(
            f"block size {block_size} must be a power of two from {MIN_BLOCK_SIZE} to "
            f"{MAX_BLOCK_SIZE}")
    if size_bytes <= 0 or size_bytes % block_size or size_bytes > MAX_EXTENT_BYTES:
        raise InvalidArgument(
            f"extent size {size_bytes} must be a positive multiple of the block size "
            f"{block_size} and at most {MAX_EXTENT_BYTES}")


def check_range(extent: Geometry, offset: int, length: int, what: str) -> None:
    """A range of whole blocks inside the extent."""
    if length <= 0:
        raise InvalidArgument(f"{what} of extent {extent.extent_id}: length must be positive")
    if offset % extent.block_size or length % extent.block_size:
        raise InvalidArgument(
            f"{what} of extent {extent.extent_id}: offset {offset} and length {length} must be "
            f"multiples of the block size {extent.block_size}")
    if offset + length > extent.size:
        raise OutOfRange(
            f"{what} of extent {extent.extent_id}: [{offset}, {offset + length}) reaches past "
            f"its end at {extent.size}")


def check_read(extent: Geometry, offset: int, length: int) -> None:
    check_range(extent, offset, length, "read")
    if length > MAX_IO_BYTES:
        raise InvalidArgument(f"read chunks are at most {MAX_IO_BYTES} bytes")


def check_write(extent: Geometry, offset: int, length: int) -> None:
    if length > MAX_IO_BYTES:
        raise InvalidArgument(
            f"write of {length} bytes is larger than {MAX_IO_BYTES}; use WriteStream")
    check_range(extent, offset, length, "write")


def check_copy(target: Geometry, source: Geometry | None,
               ranges: Sequence[CopyRange]) -> None:
    """A copy's target ranges (and source ranges if the source is local): inside their
    extents, whole blocks, target ranges disjoint, and within one extent source and
    target apart. `ranges` should be coalesced first: the same checks on fewer ranges."""
    if not ranges:
        raise InvalidArgument("a copy needs at least one range")
    seen: list[tuple[int, int]] = []
    for r in ranges:
        check_range(target, r.target_offset, r.length, "copy into")
        seen.append((r.target_offset, r.target_offset + r.length))
        if source is not None:
            check_range(source, r.source_offset, r.length, "copy from")
            if source.extent_id == target.extent_id and _overlaps(
                    r.source_offset, r.target_offset, r.length):
                raise InvalidArgument(
                    f"copy within extent {target.extent_id}: source and target ranges overlap")
    seen.sort()
    for (_, end), (start, _) in itertools.pairwise(seen):
        if start < end:
            raise InvalidArgument(f"copy into extent {target.extent_id}: target ranges overlap")


def coalesce(ranges: Iterable[RangeLike]) -> list[CopyRange]:
    """Merges ranges that continue each other on both sides, keeping their order: a
    block-by-block job list becomes a few long ranges (fewer checks, syscalls, streams)."""
    out: list[CopyRange] = []
    source = target = length = 0
    for r in ranges:
        if r.length <= 0:
            raise InvalidArgument("every copy range needs a positive length")
        if length and source + length == r.source_offset and target + length == r.target_offset:
            length += r.length
            continue
        if length:
            out.append(CopyRange(source, target, length))
        source, target, length = r.source_offset, r.target_offset, r.length
    if length:
        out.append(CopyRange(source, target, length))
    return out


def split(ranges: Iterable[CopyRange], piece_bytes: int) -> list[CopyRange]:
    """Cuts ranges into pieces of at most `piece_bytes`, in order."""
    out = []
    for r in ranges:
        done = 0
        while done < r.length:
            n = min(piece_bytes, r.length - done)
            out.append(CopyRange(r.source_offset + done, r.target_offset + done, n))
            done += n
    return out


def _overlaps(a: int, b: int, length: int) -> bool:
    return a < b + length and b < a + length
