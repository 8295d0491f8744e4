"""The block store: one sparse extent file per volume (or volume stripe) in a directory.

Layout of the data directory:

    extents/<extent_id>.extent   the data: a sparse file of exactly size_bytes
    extents/<extent_id>.meta     JSON: size, block size, highest fencing epoch, state

The `.meta` file is the truth: an extent exists when its meta says "live". A
deleted extent keeps a "deleted" meta (a tombstone) so its highest epoch survives
and a stale owner cannot re-create it. Meta files are replaced atomically and
durably (see `fileio.write_file_durably`); a `.extent` file without a live meta is
debris of a crash during create or delete and is removed on start.

Fencing: every mutation names an epoch. Lower than the extent's epoch: FencedOut.
Higher: the new epoch is made durable *before* the mutation runs, under the
extent's exclusive gate, so once a newer owner has been seen no older mutation can
land, across restarts too. The store knows nothing about maps or volumes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent import fileio
from agent.gate import Gate
from volkin.errors import (
    AlreadyExists,
    FencedOut,
    InvalidArgument,
    NotFound,
    OutOfRange,
)

# Largest payload of one Write (or one Read/peer-copy chunk): bigger ranges stream.
MAX_IO_BYTES = 4 << 20
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = MAX_IO_BYTES
MAX_EXTENT_BYTES = 1 << 56
_META_FORMAT = 1
_EXTENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ExtentInfo:
    extent_id: str
    size_bytes: int
    block_size: int
    allocated_bytes: int
    epoch: int


@dataclass(frozen=True)
class CopyRange:
    source_offset: int
    target_offset: int
    length: int


class _Extent:
    """An open live extent. `epoch` and `deleted` change only under the exclusive gate."""

    def __init__(self, extent_id: str, size: int, block_size: int, epoch: int, fd: int) -> None:
        self.extent_id = extent_id
        self.size = size
        self.block_size = block_size
        self.epoch = epoch
        self.fd = fd
        self.deleted = False
        self.gate = Gate()


def check_extent_id(extent_id: str) -> None:
    if not _EXTENT_ID.fullmatch(extent_id):
        raise InvalidArgument(
            f"extent id {extent_id!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")


def check_epoch(epoch: int) -> None:
    if epoch < 1:
        raise InvalidArgument("every mutating call must carry a fencing epoch >= 1")


class BlockStore:
    """Extents of one agent. Thread-safe: calls may run in any number of threads."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir / "extents"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the two dicts, never held during I/O
        self._create_lock = threading.Lock()  # serializes creates (they do I/O)
        self._live: dict[str, _Extent] = {}
        self._tombstones: dict[str, int] = {}
        self._load()

    # -- lifecycle -------------------------------------------------------------------

    def _load(self) -> None:
        for meta_path in sorted(self._dir.glob("*.meta")):
            extent_id = meta_path.name[: -len(".meta")]
            with fileio.storage_errors(f"loading extent {extent_id}"):
                meta = json.loads(meta_path.read_bytes())
            if meta.get("state") == "deleted":
                self._tombstones[extent_id] = int(meta["epoch"])
                continue
            with fileio.storage_errors(f"opening extent {extent_id}"):
                fd = os.open(self._data_path(extent_id), os.O_RDWR)
            self._live[extent_id] = _Extent(
                extent_id, int(meta["size_bytes"]), int(meta["block_size"]), int(meta["epoch"]), fd)
        for data_path in self._dir.glob("*.extent"):
            if data_path.name[: -len(".extent")] not in self._live:
                data_path.unlink()  # debris of a crash during create or delete
        for tmp in self._dir.glob("*.tmp"):
            tmp.unlink()

    def close(self) -> None:
        with self._lock:
            extents, self._live = list(self._live.values()), {}
        for ext in extents:
            os.close(ext.fd)

    # -- metadata --------------------------------------------------------------------

    def _data_path(self, extent_id: str) -> Path:
        return self._dir / f"{extent_id}.extent"

    def _write_meta(self, extent_id: str, size: int, block_size: int, epoch: int,
                    state: str) -> None:
        meta = {"format": _META_FORMAT, "extent_id": extent_id, "size_bytes": size,
                "block_size": block_size, "epoch": epoch, "state": state}
        with fileio.storage_errors(f"recording metadata of extent {extent_id}"):
            fileio.write_file_durably(self._dir / f"{extent_id}.meta",
                                      json.dumps(meta, sort_keys=True).encode())

    def _get(self, extent_id: str) -> _Extent:
        check_extent_id(extent_id)
        with self._lock:
            ext = self._live.get(extent_id)
        if ext is None:
            raise NotFound(f"extent {extent_id} does not exist on this agent")
        return ext

    def _info(self, ext: _Extent) -> ExtentInfo:
        with fileio.storage_errors(f"stat of extent {ext.extent_id}"):
            allocated = os.fstat(ext.fd).st_blocks * 512
        return ExtentInfo(ext.extent_id, ext.size, ext.block_size, allocated, ext.epoch)

    # -- fencing ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _mutating(self, ext: _Extent, epoch: int) -> Iterator[None]:
        """Holds `ext` shared for a mutation at `epoch`, first recording a newer epoch."""
        check_epoch(epoch)
        while True:
            with ext.gate.shared():
                if ext.deleted:
                    raise NotFound(f"extent {ext.extent_id} does not exist on this agent")
                if epoch < ext.epoch:
                    raise _fenced(ext, epoch)
                if epoch == ext.epoch:
                    yield
                    return
            with ext.gate.exclusive():
                if not ext.deleted and epoch > ext.epoch:
                    self._write_meta(ext.extent_id, ext.size, ext.block_size, epoch, "live")
                    ext.epoch = epoch

    # -- validation ------------------------------------------------------------------

    @staticmethod
    def _check_range(ext: _Extent, offset: int, length: int, what: str) -> None:
        if length <= 0:
            raise InvalidArgument(f"{what} of extent {ext.extent_id}: length must be positive")
        if offset % ext.block_size or length % ext.block_size:
            raise InvalidArgument(
                f"{what} of extent {ext.extent_id}: offset {offset} and length {length} must be "
                f"multiples of the block size {ext.block_size}")
        if offset + length > ext.size:
            raise OutOfRange(
                f"{what} of extent {ext.extent_id}: [{offset}, {offset + length}) reaches past "
                f"its end at {ext.size}")

    def check_range(self, extent_id: str, offset: int, length: int, what: str) -> ExtentInfo:
        """Validates a range of an extent without touching data; returns the extent."""
        ext = self._get(extent_id)
        self._check_range(ext, offset, length, what)
        return self._info(ext)

    # -- calls -----------------------------------------------------------------------

    def create(self, extent_id: str, size_bytes: int, block_size: int, epoch: int) -> ExtentInfo:
        """Creates a zero-filled sparse extent; the same create again is a no-op."""
        check_extent_id(extent_id)
        check_epoch(epoch)
        if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or (
                block_size & (block_size - 1)):
            raise InvalidArgument(
                f"block size {block_size} must be a power of two from {MIN_BLOCK_SIZE} to "
                f"{MAX_BLOCK_SIZE}")
        if size_bytes <= 0 or size_bytes % block_size or size_bytes > MAX_EXTENT_BYTES:
            raise InvalidArgument(
                f"extent size {size_bytes} must be a positive multiple of the block size "
                f"{block_size} and at most {MAX_EXTENT_BYTES}")
        with self._create_lock:
            with self._lock:
                existing = self._live.get(extent_id)
                tomb = self._tombstones.get(extent_id, 0)
            if existing is None:
                if epoch < tomb:
                    raise FencedOut(
                        f"extent {extent_id} was deleted at epoch {tomb}; epoch {epoch} is older")
                ext = self._create_files(extent_id, size_bytes, block_size, epoch)
                with self._lock:
                    self._live[extent_id] = ext
                    self._tombstones.pop(extent_id, None)
                return self._info(ext)
        if (existing.size, existing.block_size) != (size_bytes, block_size):
            raise AlreadyExists(
                f"extent {extent_id} exists with size {existing.size} and block size "
                f"{existing.block_size}; delete it first to change them")
        with self._mutating(existing, epoch):
            return self._info(existing)

    def _create_files(self, extent_id: str, size: int, block_size: int, epoch: int) -> _Extent:
        # Data file first, meta last: the meta is what makes the extent exist.
        path = self._data_path(extent_id)
        with fileio.storage_errors(f"creating extent {extent_id}"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
                self._write_meta(extent_id, size, block_size, epoch, "live")
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    path.unlink()
                raise
        return _Extent(extent_id, size, block_size, epoch, fd)

    def delete(self, extent_id: str, epoch: int) -> None:
        """Deletes an extent, leaving a tombstone that remembers its epoch."""
        check_epoch(epoch)
        ext = self._get(extent_id)
        with self._mutating(ext, epoch):
            pass  # refuses an older epoch and records a newer one
        with ext.gate.exclusive():
            if ext.deleted:
                return
            if epoch < ext.epoch:
                raise _fenced(ext, epoch)
            # Tombstone first: after a crash the extent is gone, and its data file
            # is debris that the next start removes.
            self._write_meta(extent_id, ext.size, ext.block_size, ext.epoch, "deleted")
            ext.deleted = True
            with self._lock:
                self._live.pop(extent_id, None)
                self._tombstones[extent_id] = ext.epoch
            os.close(ext.fd)
            with fileio.storage_errors(f"deleting extent {extent_id}"):
                self._data_path(extent_id).unlink(missing_ok=True)
                fileio.fsync_dir(self._dir)

    def stat(self, extent_id: str) -> ExtentInfo:
        return self._info(self._get(extent_id))

    def list(self) -> list[ExtentInfo]:
        with self._lock:
            extents = sorted(self._live.values(), key=lambda e: e.extent_id)
        return [self._info(e) for e in extents]

    def count(self) -> int:
        with self._lock:
            return len(self._live)

    def read(self, extent_id: str, offset: int, length: int) -> bytes:
        """Reads one chunk of at most MAX_IO_BYTES; callers split larger ranges."""
        ext = self._get(extent_id)
        self._check_range(ext, offset, length, "read")
        if length > MAX_IO_BYTES:
            raise InvalidArgument(f"read chunks are at most {MAX_IO_BYTES} bytes")
        with ext.gate.shared():
            if ext.deleted:
                raise NotFound(f"extent {extent_id} does not exist on this agent")
            with fileio.storage_errors(f"read of extent {extent_id}"):
                return fileio.pread_exact(ext.fd, length, offset)

    def read_nowait(self, extent_id: str, offset: int, length: int) -> bytes | None:
        """`read`, but only if it needs no waiting (data in the page cache); else None."""
        ext = self._get(extent_id)
        self._check_range(ext, offset, length, "read")
        if length > MAX_IO_BYTES:
            raise InvalidArgument(f"read chunks are at most {MAX_IO_BYTES} bytes")
        if not ext.gate.try_acquire_shared():
            return None
        try:
            if ext.deleted:
                raise NotFound(f"extent {extent_id} does not exist on this agent")
            with fileio.storage_errors(f"read of extent {extent_id}"):
                return fileio.pread_cached(ext.fd, length, offset)
        finally:
            ext.gate.release_shared()

    def write_buffered_nowait(self, extent_id: str, offset: int, data: bytes,
                              epoch: int) -> int | None:
        """`write` without fua, if it needs no waiting for the gate or an epoch record;
        else None (then call `write` from a worker thread). A buffered pwrite only
        copies into the page cache, unless the kernel throttles dirty pages."""
        ext = self._get(extent_id)
        if len(data) > MAX_IO_BYTES:
            raise InvalidArgument(
                f"write of {len(data)} bytes is larger than {MAX_IO_BYTES}; use WriteStream")
        self._check_range(ext, offset, len(data), "write")
        check_epoch(epoch)
        if not ext.gate.try_acquire_shared():
            return None
        try:
            if ext.deleted:
                raise NotFound(f"extent {extent_id} does not exist on this agent")
            if epoch < ext.epoch:
                raise _fenced(ext, epoch)
            if epoch > ext.epoch:
                return None  # recording the new epoch means an fsync: not here
            with fileio.storage_errors(f"write to extent {extent_id}"):
                fileio.pwrite_all(ext.fd, data, offset)
            return len(data)
        finally:
            ext.gate.release_shared()

    def write(self, extent_id: str, offset: int, data: bytes, fua: bool, epoch: int) -> int:
        """Writes `data` at `offset`; with `fua` it is on stable storage before returning."""
        ext = self._get(extent_id)
        if len(data) > MAX_IO_BYTES:
            raise InvalidArgument(
                f"write of {len(data)} bytes is larger than {MAX_IO_BYTES}; use WriteStream")
        self._check_range(ext, offset, len(data), "write")
        with self._mutating(ext, epoch), fileio.storage_errors(f"write to extent {extent_id}"):
            fileio.pwrite_all(ext.fd, data, offset)
            if fua:
                os.fdatasync(ext.fd)
        return len(data)

    def zero(self, extent_id: str, offset: int, length: int, punch_hole: bool, fua: bool,
             epoch: int) -> None:
        """Makes a range read as zeros; `punch_hole` also frees its space (trim)."""
        ext = self._get(extent_id)
        self._check_range(ext, offset, length, "zero")
        with self._mutating(ext, epoch), fileio.storage_errors(f"zero of extent {extent_id}"):
            fileio.zero_range(ext.fd, offset, length, punch_hole)
            if fua:
                os.fdatasync(ext.fd)

    def flush(self, extent_id: str, epoch: int) -> None:
        """Makes every completed write and copy into the extent durable."""
        ext = self._get(extent_id)
        with self._mutating(ext, epoch), fileio.storage_errors(f"flush of extent {extent_id}"):
            os.fdatasync(ext.fd)

    def check_copy(self, target_id: str, source_id: str | None,
                   ranges: Sequence[CopyRange]) -> None:
        """Validates a copy's target ranges (and source ranges if the source is local)."""
        if not ranges:
            raise InvalidArgument("a copy needs at least one range")
        ranges = coalesce(ranges)  # same checks on far fewer ranges
        target = self._get(target_id)
        source = self._get(source_id) if source_id is not None else None
        seen: list[tuple[int, int]] = []
        for r in ranges:
            self._check_range(target, r.target_offset, r.length, "copy into")
            seen.append((r.target_offset, r.target_offset + r.length))
            if source is not None:
                self._check_range(source, r.source_offset, r.length, "copy from")
                if source is target and _overlaps(r.source_offset, r.target_offset, r.length):
                    raise InvalidArgument(
                        f"copy within extent {target_id}: source and target ranges overlap")
        seen.sort()
        for (_, end), (start, _) in itertools.pairwise(seen):
            if start < end:
                raise InvalidArgument(f"copy into extent {target_id}: target ranges overlap")

    def copy_local(self, target_id: str, source_id: str, ranges: Sequence[CopyRange],
                   durable: bool, epoch: int) -> int:
        """Copies ranges between two extents of this agent inside the kernel."""
        ranges = coalesce(ranges)
        self.check_copy(target_id, source_id, ranges)
        target = self._get(target_id)
        source = self._get(source_id)
        total = 0
        with self._mutating(target, epoch), _shared_unless(source, target):
            if source.deleted:
                raise NotFound(f"extent {source_id} does not exist on this agent")
            with fileio.storage_errors(f"copy from {source_id} into {target_id}"):
                for r in ranges:
                    fileio.copy_range(source.fd, target.fd, r.length, r.source_offset,
                                      r.target_offset)
                    total += r.length
                if durable:
                    os.fdatasync(target.fd)
        return total


class RangeLike(Protocol):
    """A CopyRange or its protobuf message: both name their fields alike."""

    @property
    def source_offset(self) -> int: ...
    @property
    def target_offset(self) -> int: ...
    @property
    def length(self) -> int: ...


def _fenced(ext: _Extent, epoch: int) -> FencedOut:
    return FencedOut(f"extent {ext.extent_id}: epoch {epoch} is older than epoch {ext.epoch} "
                     "already seen; a newer controller owns it")


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


def _overlaps(a: int, b: int, length: int) -> bool:
    return a < b + length and b < a + length


@contextlib.contextmanager
def _shared_unless(ext: _Extent, already_held: _Extent) -> Iterator[None]:
    if ext is already_held:
        yield
    else:
        with ext.gate.shared():
            yield
