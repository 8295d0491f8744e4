"""The block store: this node's extents, open, and the order in which each call works.

Every call goes through the same steps, each owned by its own module:

1. validate the request (`agent.validation`): names, geometry, ranges;
2. for a mutation, be admitted by the node's fence (`agent.fencing`): refused if its
   epoch is older than the node's, a newer epoch recorded durably first, and only
   while the agent can prove no newer controller took over unseen;
3. hold the extent's gate shared while its file descriptor is used (deleting holds
   it exclusive), always *after* the node gate;
4. do the I/O (`agent.fileio`); metadata goes through `agent.extentmeta`.

The store knows nothing about maps or volumes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import fileio
from agent.extentmeta import ExtentDir, ExtentMeta
from agent.fencing import Clock, NodeFence
from agent.gate import Gate
from agent.validation import (
    CopyRange,
    Geometry,
    check_copy,
    check_extent_id,
    check_geometry,
    check_range,
    check_read,
    check_write,
    coalesce,
    split,
)
from volkin.blockwire import Data
from volkin.errors import AlreadyExists, FailedPrecondition, NotFound

# A local copy is admitted by the fence batch by batch: a Fence waits for at most one
# batch in flight, and a batch admitted at the end of the agent's validity lands soon
# after it (see fencing.validity_margin).
COPY_BATCH_BYTES = 16 << 20
DEFAULT_FENCE_WAIT = 5.0


@dataclass(frozen=True)
class ExtentInfo:
    extent_id: str
    size_bytes: int
    block_size: int
    allocated_bytes: int
    # The node's fencing epoch when the call answered (epochs are node-wide).
    epoch: int


class _Extent:
    """An open live extent. `deleted` changes, and `fd` is closed, only under the
    exclusive gate, so a holder of the gate shared may use `fd`."""

    def __init__(self, meta: ExtentMeta, fd: int) -> None:
        self.geometry = Geometry(meta.extent_id, meta.size_bytes, meta.block_size)
        self.extent_id = meta.extent_id
        self.fd = fd
        self.deleted = False
        self.gate = Gate()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Holds the gate shared; NotFound if the extent was deleted meanwhile."""
        with self.gate.shared():
            if self.deleted:
                raise _not_found(self.extent_id)
            yield


class BlockStore:
    """Extents of one agent. Thread-safe: calls may run in any number of threads."""

    def __init__(self, data_dir: Path, *, node_id: str = "agent",
                 fence_wait: float = DEFAULT_FENCE_WAIT, clock: Clock = time.monotonic) -> None:
        """Opens the store: reads the metas (removing crash debris), then the node
        epoch (initialised from the metas if the data directory has none yet)."""
        self.data_dir = data_dir
        self._dir = ExtentDir(data_dir / "extents")
        scan = self._dir.scan()
        self.fence = NodeFence(data_dir, node_id, fence_wait, scan.highest_epoch, clock)
        self._lock = threading.Lock()  # guards _live, never held during I/O
        self._lifecycle_lock = threading.Lock()  # serializes creates and deletes (they do I/O)
        self._live: dict[str, _Extent] = {}
        for meta in scan.live:
            with fileio.storage_errors(f"opening extent {meta.extent_id}"):
                fd = os.open(self._dir.data_path(meta.extent_id), os.O_RDWR)
            self._live[meta.extent_id] = _Extent(meta, fd)

    def close(self) -> None:
        with self._lock:
            extents, self._live = list(self._live.values()), {}
        for ext in extents:
            os.close(ext.fd)

    # -- lookups -----------------------------------------------------------------------

    def _get(self, extent_id: str) -> _Extent:
        check_extent_id(extent_id)
        with self._lock:
            ext = self._live.get(extent_id)
        if ext is None:
            raise _not_found(extent_id)
        return ext

    def _info(self, ext: _Extent) -> ExtentInfo:
        with ext.in_use(), fileio.storage_errors(f"stat of extent {ext.extent_id}"):
            allocated = os.fstat(ext.fd).st_blocks * 512
        g = ext.geometry
        return ExtentInfo(g.extent_id, g.size, g.block_size, allocated, self.fence.epoch)

    def stat(self, extent_id: str) -> ExtentInfo:
        return self._info(self._get(extent_id))

    def list(self) -> list[ExtentInfo]:
        with self._lock:
            extents = sorted(self._live.values(), key=lambda e: e.extent_id)
        infos = []
        for ext in extents:
            with contextlib.suppress(NotFound):  # deleted since the listing
                infos.append(self._info(ext))
        return infos

    def count(self) -> int:
        with self._lock:
            return len(self._live)

    def space(self) -> tuple[int, int, int]:
        """(capacity, used, available) bytes of the file system of the data directory:
        its size, what anything uses on it, and what this process may still allocate."""
        with fileio.storage_errors("asking the data directory's file system for its space"):
            fs = os.statvfs(self.data_dir)
        return (fs.f_blocks * fs.f_frsize, (fs.f_blocks - fs.f_bfree) * fs.f_frsize,
                fs.f_bavail * fs.f_frsize)

    def check_range(self, extent_id: str, offset: int, length: int, what: str) -> ExtentInfo:
        """Validates a range of an extent without touching data; returns the extent."""
        ext = self._get(extent_id)
        check_range(ext.geometry, offset, length, what)
        return self._info(ext)

    def check_copy(self, target_id: str, source_id: str | None,
                   ranges: Sequence[CopyRange]) -> None:
        """Validates a copy's target ranges (and source ranges if the source is local)."""
        merged = coalesce(ranges)  # same checks on far fewer ranges
        target = self._get(target_id)
        source = self._get(source_id) if source_id is not None else None
        check_copy(target.geometry, source.geometry if source else None, merged)

    # -- creating and deleting -----------------------------------------------------------

    def create(self, extent_id: str, size_bytes: int, block_size: int, epoch: int) -> ExtentInfo:
        """Creates a zero-filled sparse extent; the same create again is a no-op."""
        check_extent_id(extent_id)
        check_geometry(size_bytes, block_size)
        with self.fence.admitted(epoch), self._lifecycle_lock:
            with self._lock:
                ext = self._live.get(extent_id)
            if ext is None:
                ext = self._create_files(ExtentMeta(extent_id, size_bytes, block_size, epoch,
                                                    "live"))
                with self._lock:
                    self._live[extent_id] = ext
            elif (ext.geometry.size, ext.geometry.block_size) != (size_bytes, block_size):
                raise AlreadyExists(
                    f"extent {extent_id} exists with size {ext.geometry.size} and block size "
                    f"{ext.geometry.block_size}; delete it first to change them")
        return self._info(ext)

    def _create_files(self, meta: ExtentMeta) -> _Extent:
        # Data file first, meta last: the meta is what makes the extent exist.
        path = self._dir.data_path(meta.extent_id)
        with fileio.storage_errors(f"creating extent {meta.extent_id}"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, meta.size_bytes)
                os.fsync(fd)
                self._dir.write_meta(meta)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    path.unlink()
                raise
        return _Extent(meta, fd)

    def resize(self, extent_id: str, size_bytes: int, epoch: int) -> ExtentInfo:
        """Grows an extent to `size_bytes`; the new bytes read as zeros (a hole). The same
        size again is a no-op; a smaller one is refused (extents only grow).

        The data file grows first (durably), then the meta records the new size: a
        crash in between leaves a data file longer than its meta says, which is
        harmless (the extent keeps its old size until the resize is repeated)."""
        ext = self._get(extent_id)
        check_geometry(size_bytes, ext.geometry.block_size)
        with self.fence.admitted(epoch), self._lifecycle_lock, ext.gate.exclusive():
            if ext.deleted:
                raise _not_found(extent_id)
            g = ext.geometry
            if size_bytes < g.size:
                raise FailedPrecondition(
                    f"extent {extent_id} has {g.size} bytes; it cannot shrink to {size_bytes} "
                    f"(extents only grow)")
            if size_bytes > g.size:
                with fileio.storage_errors(f"growing extent {extent_id}"):
                    os.ftruncate(ext.fd, size_bytes)
                    os.fsync(ext.fd)
                self._dir.write_meta(ExtentMeta(extent_id, size_bytes, g.block_size, epoch,
                                                "live"))
                ext.geometry = Geometry(extent_id, size_bytes, g.block_size)
        return self._info(ext)

    def delete(self, extent_id: str, epoch: int) -> None:
        """Deletes an extent, leaving a tombstone meta (which records the epoch)."""
        ext = self._get(extent_id)
        with self.fence.admitted(epoch), self._lifecycle_lock, ext.gate.exclusive():
            if ext.deleted:
                return
            # Tombstone first: after a crash the extent is gone, and its data file
            # is debris that the next start removes.
            g = ext.geometry
            self._dir.write_meta(ExtentMeta(extent_id, g.size, g.block_size, epoch, "deleted"))
            ext.deleted = True
            with self._lock:
                self._live.pop(extent_id, None)
            os.close(ext.fd)
            with fileio.storage_errors(f"deleting extent {extent_id}"):
                self._dir.data_path(extent_id).unlink(missing_ok=True)
                fileio.fsync_dir(self._dir.path)

    # -- reads (not fenced) ---------------------------------------------------------------

    def read(self, extent_id: str, offset: int, length: int) -> bytes:
        """Reads one chunk of at most MAX_IO_BYTES; callers split larger ranges."""
        ext = self._get(extent_id)
        check_read(ext.geometry, offset, length)
        with ext.in_use(), fileio.storage_errors(f"read of extent {extent_id}"):
            return fileio.pread_exact(ext.fd, length, offset)

    def data_ranges(self, extent_id: str, offset: int, length: int,
                    limit: int) -> Sequence[tuple[int, int]]:
        """Where [offset, offset + length) of the extent holds data (holes read as zeros)."""
        ext = self._get(extent_id)
        check_range(ext.geometry, offset, length, "map")
        with ext.in_use(), fileio.storage_errors(f"map of extent {extent_id}"):
            return fileio.data_ranges(ext.fd, offset, length, limit)

    def read_nowait(self, extent_id: str, offset: int, length: int) -> bytearray | None:
        """`read`, but only if it needs no waiting (data in the page cache); else None."""
        ext = self._get(extent_id)
        check_read(ext.geometry, offset, length)
        if not ext.gate.try_acquire_shared():
            return None
        try:
            if ext.deleted:
                raise _not_found(extent_id)
            with fileio.storage_errors(f"read of extent {extent_id}"):
                return fileio.pread_cached(ext.fd, length, offset)
        finally:
            ext.gate.release_shared()

    # -- mutations (fenced) --------------------------------------------------------------

    def write_buffered_nowait(self, extent_id: str, offset: int, data: Data,
                              epoch: int) -> int | None:
        """`write` without fua, if nothing has to wait: no gate held exclusive, the
        epoch is the node's and the agent is valid; else None (then call `write` from a
        worker thread). A buffered pwrite only copies into the page cache, unless the
        kernel throttles dirty pages. An older epoch is refused here at once."""
        ext = self._get(extent_id)
        check_write(ext.geometry, offset, len(data))
        if not self.fence.try_admit(epoch):
            return None
        try:
            if not ext.gate.try_acquire_shared():
                return None
            try:
                if ext.deleted:
                    raise _not_found(extent_id)
                with fileio.storage_errors(f"write to extent {extent_id}"):
                    fileio.pwrite_all(ext.fd, data, offset)
                return len(data)
            finally:
                ext.gate.release_shared()
        finally:
            self.fence.release()

    def write(self, extent_id: str, offset: int, data: Data, fua: bool, epoch: int) -> int:
        """Writes `data` at `offset`; with `fua` it is on stable storage before returning."""
        ext = self._get(extent_id)
        check_write(ext.geometry, offset, len(data))
        with (self.fence.admitted(epoch), ext.in_use(),
              fileio.storage_errors(f"write to extent {extent_id}")):
            fileio.pwrite_all(ext.fd, data, offset)
            if fua:
                os.fdatasync(ext.fd)
        return len(data)

    def zero(self, extent_id: str, offset: int, length: int, punch_hole: bool, fua: bool,
             epoch: int) -> None:
        """Makes a range read as zeros; `punch_hole` also frees its space (trim)."""
        ext = self._get(extent_id)
        check_range(ext.geometry, offset, length, "zero")
        with (self.fence.admitted(epoch), ext.in_use(),
              fileio.storage_errors(f"zero of extent {extent_id}")):
            fileio.zero_range(ext.fd, offset, length, punch_hole)
            if fua:
                os.fdatasync(ext.fd)

    def flush(self, extent_id: str, epoch: int) -> None:
        """Makes every completed write and copy into the extent durable."""
        ext = self._get(extent_id)
        with (self.fence.admitted(epoch), ext.in_use(),
              fileio.storage_errors(f"flush of extent {extent_id}")):
            os.fdatasync(ext.fd)

    def copy_local(self, target_id: str, source_id: str, ranges: Sequence[CopyRange],
                   durable: bool, epoch: int) -> int:
        """Copies ranges between two extents of this agent inside the kernel, admitted by
        the fence batch by batch (a copy refused midway is simply repeated: idempotent)."""
        merged = coalesce(ranges)
        target = self._get(target_id)
        source = self._get(source_id)
        check_copy(target.geometry, source.geometry, merged)
        self.fence.refuse_older(epoch)  # a stale copy fails before any batch
        total = 0
        for batch in _batches(split(merged, COPY_BATCH_BYTES), COPY_BATCH_BYTES):
            with (self.fence.admitted(epoch), target.in_use(), _in_use_unless(source, target),
                  fileio.storage_errors(f"copy from {source_id} into {target_id}")):
                for r in batch:
                    fileio.copy_thin(source.fd, target.fd, r.length, r.source_offset,
                                     r.target_offset)
                    total += r.length
        if durable:
            self.flush(target_id, epoch)
        return total


def _not_found(extent_id: str) -> NotFound:
    return NotFound(f"extent {extent_id} does not exist on this agent")


def _batches(pieces: list[CopyRange], limit: int) -> Iterator[list[CopyRange]]:
    """Groups consecutive pieces (each at most `limit` bytes) into runs of at most `limit`."""
    batch: list[CopyRange] = []
    size = 0
    for piece in pieces:
        if batch and size + piece.length > limit:
            yield batch
            batch, size = [], 0
        batch.append(piece)
        size += piece.length
    if batch:
        yield batch


@contextlib.contextmanager
def _in_use_unless(ext: _Extent, already_held: _Extent) -> Iterator[None]:
    if ext is already_held:
        yield
    else:
        with ext.in_use():
            yield
