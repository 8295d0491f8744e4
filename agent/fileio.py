"""Low-level file operations of the block store, with OS errors turned into domain errors.

Everything here works on open file descriptors and byte offsets; it knows nothing
about extents, epochs or validation.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from volkin.errors import InvalidArgument, StorageFull, StorageIOError

# linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Re-raises OSError as StorageFull (ENOSPC, EDQUOT), InvalidArgument (EFBIG: a file
    larger than the file system allows) or StorageIOError (anything else), naming `what`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"{what}: no space left on the agent's data disk") from exc
        if exc.errno == errno.EFBIG:
            raise InvalidArgument(
                f"{what}: larger than the agent's data file system allows for one file") from exc
        raise StorageIOError(f"{what}: {exc.strerror or exc} (errno {exc.errno})") from exc


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Reads exactly `length` bytes; a short file is an I/O error, not silent zeros."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"short read at offset {offset + got}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pread_cached(fd: int, length: int, offset: int) -> bytearray | None:
    """Reads the range only if it is all in the page cache (preadv RWF_NOWAIT): it never
    waits for the device. None means: read it with pread_exact in a worker thread. The
    buffer the kernel filled is returned as it is (not copied into a bytes)."""
    buffer = bytearray(length)
    try:
        n = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return buffer if n == length else None


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Writes all of `data` at `offset`, continuing after short writes."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def data_ranges(fd: int, offset: int, length: int,
                limit: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of [offset, offset + length) that hold data, by
    SEEK_DATA/SEEK_HOLE: the rest are holes and read as zeros. At most `limit` ranges: if
    there are more, the last one runs to the end (it may hold holes too, which is safe:
    they read as zeros). A file system that cannot tell says all data."""
    end = offset + length
    status = os.fstat(fd)
    if status.st_blocks * 512 >= status.st_size:  # no room for a hole anywhere: no seeking
        return [(offset, length)]
    found: list[tuple[int, int]] = []
    position = offset
    try:
        while position < end:
            if len(found) == limit - 1:  # no room left to tell holes apart
                found.append((position, end - position))
                break
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only holes from here to the end of the file
                    break
                raise
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            found.append((start, stop - start))
            position = stop
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(offset, length)]
        raise
    return found


def copy_thin(src_fd: int, dst_fd: int, length: int, src_offset: int,
              dst_offset: int) -> None:
    """`copy_range`, but a hole of the source stays a hole: its range is punched in the
    target instead of being copied as zeros (the bytes are the same)."""
    position = src_offset
    end = src_offset + length
    for start, size in [*data_ranges(src_fd, src_offset, length, 1 << 16), (end, 0)]:
        if start > position:
            zero_range(dst_fd, dst_offset + position - src_offset, start - position, True)
        if size:
            copy_range(src_fd, dst_fd, size, start, dst_offset + start - src_offset)
        position = start + size


def copy_range(src_fd: int, dst_fd: int, length: int, src_offset: int, dst_offset: int) -> None:
    """Copies in the kernel (`copy_file_range`): no bytes pass through user space."""
    while length > 0:
        n = os.copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)
        if n == 0:
            raise OSError(errno.EIO, f"copy_file_range stopped at source offset {src_offset}")
        length -= n
        src_offset += n
        dst_offset += n


def _try_fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """True if fallocate did it; False if the file system does not support `mode`."""
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def zero_range(fd: int, offset: int, length: int, punch_hole: bool) -> None:
    """Makes [offset, offset+length) read as zeros; `punch_hole` also frees the space.

    Prefers fallocate (PUNCH_HOLE or ZERO_RANGE, both keeping the file size) and falls
    back to writing zeros where the file system supports neither.
    """
    mode = _FALLOC_FL_KEEP_SIZE | (_FALLOC_FL_PUNCH_HOLE if punch_hole else _FALLOC_FL_ZERO_RANGE)
    if _try_fallocate(fd, mode, offset, length):
        return
    if not punch_hole and _try_fallocate(
            fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length):
        return
    zeros = bytes(min(length, _ZERO_CHUNK))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        pwrite_all(fd, memoryview(zeros)[:n], offset)
        offset += n


def write_file_durably(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` atomically and durably.

    Order: write a temporary file, fsync it, rename it over `path`, fsync the
    directory. A crash leaves either the old or the new content, never a mix.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Makes creations, renames and unlinks in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
