"""The block store on its own, in process: files, metadata, fencing, validation.

Fencing and validity in depth: test_fencing.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.blockstore import BlockStore
from agent.validation import MAX_IO_BYTES, CopyRange, coalesce
from tests.agent.conftest import open_store
from tests.support.tmpfs import tiny_tmpfs
from volkin.errors import (
    AlreadyExists,
    FailedPrecondition,
    FencedOut,
    InvalidArgument,
    NotFound,
    OutOfRange,
    StorageFull,
)

BS = 4096


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlockStore]:
    s = open_store(tmp_path)
    yield s
    s.close()


def test_a_new_extent_reads_as_zeros_and_allocates_nothing(store: BlockStore) -> None:
    info = store.create("v1", 16 * BS, BS, epoch=1)
    assert (info.size_bytes, info.block_size, info.epoch) == (16 * BS, BS, 1)
    assert info.allocated_bytes == 0
    assert store.read("v1", 0, 16 * BS) == bytes(16 * BS)


def test_written_blocks_read_back(store: BlockStore) -> None:
    store.create("v1", 16 * BS, BS, epoch=1)
    store.write("v1", 3 * BS, b"\x07" * 2 * BS, fua=True, epoch=1)
    assert store.read("v1", 2 * BS, 4 * BS) == bytes(BS) + b"\x07" * 2 * BS + bytes(BS)


def test_extents_and_the_node_epoch_survive_reopening_the_store(tmp_path: Path) -> None:
    first = open_store(tmp_path)
    first.create("v1", 8 * BS, BS, epoch=3)
    first.write("v1", 0, b"a" * BS, fua=False, epoch=5)
    first.create("gone", 8 * BS, BS, epoch=9)
    first.delete("gone", epoch=9)
    first.close()
    second = open_store(tmp_path)
    try:
        # Epoch 9 was seen on "gone" only; it fences v1 as well.
        assert [(e.extent_id, e.epoch) for e in second.list()] == [("v1", 9)]
        assert second.read("v1", 0, BS) == b"a" * BS
        with pytest.raises(FencedOut):
            second.write("v1", 0, b"b" * BS, fua=False, epoch=8)
        with pytest.raises(FencedOut):
            second.create("gone", 8 * BS, BS, epoch=8)
    finally:
        second.close()


def test_an_older_epoch_is_refused_and_changes_nothing(store: BlockStore) -> None:
    store.create("v1", 8 * BS, BS, epoch=1)
    store.write("v1", 0, b"n" * BS, fua=False, epoch=7)
    for call in (lambda: store.write("v1", 0, b"o" * BS, fua=False, epoch=6),
                 lambda: store.zero("v1", 0, BS, punch_hole=True, fua=False, epoch=6),
                 lambda: store.flush("v1", epoch=6),
                 lambda: store.delete("v1", epoch=6),
                 lambda: store.copy_local("v1", "v1", [CopyRange(BS, 0, BS)], False, 6)):
        with pytest.raises(FencedOut, match="epoch 6 is older than epoch 7"):
            call()
    assert store.read("v1", 0, BS) == b"n" * BS
    assert store.stat("v1").epoch == 7


def test_create_is_idempotent_but_refuses_other_geometry(store: BlockStore) -> None:
    store.create("v1", 8 * BS, BS, epoch=1)
    store.write("v1", 0, b"k" * BS, fua=False, epoch=1)
    assert store.create("v1", 8 * BS, BS, epoch=2).epoch == 2
    assert store.read("v1", 0, BS) == b"k" * BS
    with pytest.raises(AlreadyExists):
        store.create("v1", 16 * BS, BS, epoch=2)


def test_an_extent_grows_keeping_its_data_and_survives_reopening(tmp_path: Path) -> None:
    first = open_store(tmp_path)
    first.create("v1", 4 * BS, BS, epoch=1)
    first.write("v1", 3 * BS, b"t" * BS, fua=True, epoch=1)
    info = first.resize("v1", 10 * BS, epoch=1)
    assert (info.size_bytes, info.allocated_bytes) == (10 * BS, BS)  # the new part is a hole
    assert first.resize("v1", 10 * BS, epoch=1).size_bytes == 10 * BS  # idempotent
    first.write("v1", 9 * BS, b"e" * BS, fua=True, epoch=1)
    first.close()
    second = open_store(tmp_path)
    try:
        assert second.stat("v1").size_bytes == 10 * BS
        assert second.read("v1", 3 * BS, 7 * BS) == b"t" * BS + bytes(5 * BS) + b"e" * BS
    finally:
        second.close()


def test_an_extent_never_shrinks_and_a_resize_is_fenced(store: BlockStore) -> None:
    store.create("v1", 8 * BS, BS, epoch=5)
    with pytest.raises(FailedPrecondition, match="extents only grow"):
        store.resize("v1", 4 * BS, epoch=5)
    with pytest.raises(FencedOut, match="epoch 4 is older than epoch 5"):
        store.resize("v1", 16 * BS, epoch=4)
    with pytest.raises(InvalidArgument):
        store.resize("v1", 16 * BS + 1, epoch=5)
    with pytest.raises(NotFound):
        store.resize("nope", 16 * BS, epoch=5)
    assert store.stat("v1").size_bytes == 8 * BS


@pytest.mark.parametrize(("offset", "length", "error"), [
    (1, BS, InvalidArgument), (0, BS + 1, InvalidArgument), (0, 0, InvalidArgument),
    (7 * BS, 2 * BS, OutOfRange), (8 * BS, BS, OutOfRange)])
def test_bad_ranges_are_refused_before_any_write(
        store: BlockStore, offset: int, length: int, error: type[Exception]) -> None:
    store.create("v1", 8 * BS, BS, epoch=1)
    store.write("v1", 0, b"z" * 8 * BS, fua=False, epoch=1)
    with pytest.raises(error):
        store.write("v1", offset, b"x" * length, fua=False, epoch=1)
    with pytest.raises(error):
        store.zero("v1", offset, length, punch_hole=False, fua=False, epoch=1)
    assert store.read("v1", 0, 8 * BS) == b"z" * 8 * BS


def test_bad_names_sizes_and_epochs_are_refused(store: BlockStore) -> None:
    for name in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(InvalidArgument):
            store.create(name, 8 * BS, BS, epoch=1)
    for size, bs in ((8 * BS, 1000), (8 * BS, 256), (BS + 1, BS), (0, BS)):
        with pytest.raises(InvalidArgument):
            store.create("v1", size, bs, epoch=1)
    with pytest.raises(InvalidArgument, match="epoch"):
        store.create("v1", 8 * BS, BS, epoch=0)
    with pytest.raises(InvalidArgument, match="larger than"):  # ext4 files end at 16 TiB
        store.create("huge", 1 << 55, BS, epoch=1)
    with pytest.raises(NotFound):
        store.read("nope", 0, BS)
    with pytest.raises(InvalidArgument, match="WriteStream"):
        store.create("big", 4 * MAX_IO_BYTES, BS, epoch=1)
        store.write("big", 0, bytes(MAX_IO_BYTES + BS), fua=False, epoch=1)
    assert [e.extent_id for e in store.list()] == ["big"]


def test_trim_punches_a_hole_and_zero_reads_zeros(store: BlockStore) -> None:
    store.create("v1", 256 * BS, BS, epoch=1)
    store.write("v1", 0, b"q" * 256 * BS, fua=True, epoch=1)
    before = store.stat("v1").allocated_bytes
    store.zero("v1", 0, 128 * BS, punch_hole=True, fua=True, epoch=1)
    store.zero("v1", 128 * BS, BS, punch_hole=False, fua=False, epoch=1)
    assert store.stat("v1").allocated_bytes <= before - 127 * BS
    assert store.read("v1", 0, 129 * BS) == bytes(129 * BS)
    assert store.read("v1", 129 * BS, BS) == b"q" * BS


def test_local_copy_moves_ranges_between_extents(store: BlockStore) -> None:
    store.create("src", 16 * BS, BS, epoch=1)
    store.create("dst", 16 * BS, BS, epoch=1)
    data = os.urandom(16 * BS)
    store.write("src", 0, data, fua=False, epoch=1)
    copied = store.copy_local("dst", "src", [CopyRange(0, 8 * BS, 4 * BS),
                                             CopyRange(12 * BS, 0, 2 * BS)], True, 1)
    assert copied == 6 * BS
    assert store.read("dst", 8 * BS, 4 * BS) == data[: 4 * BS]
    assert store.read("dst", 0, 2 * BS) == data[12 * BS: 14 * BS]
    assert store.read("dst", 2 * BS, 6 * BS) == bytes(6 * BS)


def test_overlapping_copy_ranges_are_refused(store: BlockStore) -> None:
    store.create("v1", 16 * BS, BS, epoch=1)
    with pytest.raises(InvalidArgument, match="overlap"):
        store.copy_local("v1", "v1", [CopyRange(0, BS, 2 * BS)], False, 1)
    store.create("v2", 16 * BS, BS, epoch=1)
    with pytest.raises(InvalidArgument, match="overlap"):
        store.copy_local("v2", "v1", [CopyRange(0, 0, 2 * BS), CopyRange(0, BS, BS)], False, 1)
    with pytest.raises(InvalidArgument, match="at least one range"):
        store.copy_local("v2", "v1", [], False, 1)


def test_debris_of_a_crashed_create_is_removed_on_start(tmp_path: Path) -> None:
    (tmp_path / "extents").mkdir()
    (tmp_path / "extents" / "half.extent").write_bytes(b"junk")
    (tmp_path / "extents" / "half.meta.tmp").write_bytes(b"{")
    store = open_store(tmp_path)
    try:
        assert store.list() == []
        assert sorted(p.name for p in (tmp_path / "extents").iterdir()) == []
    finally:
        store.close()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    with tiny_tmpfs(tmp_path / "tiny", "2m") as mount:
        yield mount


def test_a_full_disk_is_reported_as_storage_full(tiny_disk: Path) -> None:
    store = open_store(tiny_disk)
    try:
        store.create("v1", 1024 * BS, BS, epoch=1)
        with pytest.raises(StorageFull, match="no space"):
            for n in range(1024):
                store.write("v1", n * BS, b"f" * BS, fua=False, epoch=1)
        store.zero("v1", 0, 1024 * BS, punch_hole=True, fua=False, epoch=1)
        store.write("v1", 0, b"g" * BS, fua=False, epoch=1)  # usable again after a trim
        assert store.read("v1", 0, BS) == b"g" * BS
    finally:
        store.close()


def test_copy_ranges_that_continue_each_other_are_merged() -> None:
    ranges = [CopyRange(0, 100, 10), CopyRange(10, 110, 10), CopyRange(30, 120, 10),
              CopyRange(40, 130, 5)]
    assert coalesce(ranges) == [CopyRange(0, 100, 20), CopyRange(30, 120, 15)]
    with pytest.raises(InvalidArgument, match="positive length"):
        coalesce([CopyRange(0, 0, 10), CopyRange(10, 10, 0)])


def test_nowait_paths_step_aside_instead_of_waiting(store: BlockStore, tmp_path: Path) -> None:
    store.create("v1", 64 * BS, BS, epoch=2)
    # A newer epoch must be recorded durably first: that is not done without waiting.
    assert store.write_buffered_nowait("v1", 0, b"a" * BS, epoch=3) is None
    assert store.stat("v1").epoch == 2
    with pytest.raises(FencedOut):
        store.write_buffered_nowait("v1", 0, b"a" * BS, epoch=1)
    assert store.write_buffered_nowait("v1", 0, b"b" * BS, epoch=2) == BS
    assert store.read_nowait("v1", 0, BS) in (None, b"b" * BS)
    store.flush("v1", epoch=2)
    fd = os.open(tmp_path / "extents" / "v1.extent", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the cached pages
    finally:
        os.close(fd)
    assert store.read_nowait("v1", 0, BS) is None  # would wait for the disk
    assert store.read("v1", 0, BS) == b"b" * BS


def test_no_older_write_to_any_extent_lands_after_a_newer_epoch_was_accepted(
        store: BlockStore) -> None:
    import threading

    store.create("v1", 8 * BS, BS, epoch=1)
    store.create("v2", 8 * BS, BS, epoch=1)
    refused = [0] * 4
    landed_after = []
    newer_done = threading.Event()

    def stale_writer(n: int) -> None:
        data = bytes([n + 1]) * BS
        while True:
            started_after_newer = newer_done.is_set()
            try:
                store.write("v1", 0, data, fua=False, epoch=1)
            except FencedOut:
                refused[n] += 1
                return
            if started_after_newer:
                landed_after.append(n)  # accepted after the newer epoch returned: a bug

    threads = [threading.Thread(target=stale_writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    store.write("v2", 0, b"N" * BS, fua=False, epoch=2)  # the newer owner touches v2 only
    newer_done.set()
    for t in threads:
        t.join(10)
    assert refused == [1, 1, 1, 1]
    assert landed_after == []
    final = store.read("v1", 0, BS)
    assert final in {bytes([n + 1]) * BS for n in range(4)}
    assert store.stat("v1").epoch == 2


def test_data_ranges_are_where_the_file_holds_data_and_the_rest_reads_as_zeros(
        tmp_path: Path) -> None:
    from agent import fileio

    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"\x11" * (1 << 20))
        f.seek(5 << 20)
        f.write(b"\x22" * (64 << 10))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fileio.data_ranges(fd, 0, 8 << 20, 100) == [(1 << 20, 1 << 20),
                                                            (5 << 20, 64 << 10)]
        # From inside the data, and clipped to the range asked.
        assert fileio.data_ranges(fd, (1 << 20) + 4096, 8192, 100) == [
            ((1 << 20) + 4096, 8192)]
        assert fileio.data_ranges(fd, 6 << 20, 2 << 20, 100) == []  # holes to the end
        # Limited: the last range runs to the end, holes and all (they read as zeros).
        assert fileio.data_ranges(fd, 0, 8 << 20, 2) == [(1 << 20, 1 << 20),
                                                          (2 << 20, 6 << 20)]
        assert fileio.data_ranges(fd, 0, 8 << 20, 1) == [(0, 8 << 20)]
    finally:
        os.close(fd)
