"""Node-wide fencing in process: one epoch for every extent, Fence, validity, migration.

The same claims through real agent processes and a real etcd are in
test_agent_fencing.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import dispatch, fileio
from agent.blockstore import BlockStore
from agent.fencing import NODE_FILE, Validity, validity_margin
from agent.validation import CopyRange
from tests.agent.conftest import open_store
from volkin.errors import FencedOut, InvalidArgument, StorageIOError, Unavailable

BS = 4096


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlockStore]:
    s = open_store(tmp_path)
    yield s
    s.close()


def _node_file(data_dir: Path) -> dict[str, int]:
    return json.loads((data_dir / NODE_FILE).read_bytes())  # type: ignore[no-any-return]


# -- one epoch for the whole node ------------------------------------------------------------

def test_a_write_to_extent_b_at_epoch_1_is_refused_after_extent_a_saw_epoch_2(
        store: BlockStore) -> None:
    store.create("a", 8 * BS, BS, epoch=1)
    store.create("b", 8 * BS, BS, epoch=1)
    store.write("b", 0, b"o" * BS, fua=False, epoch=1)
    store.write("a", 0, b"n" * BS, fua=False, epoch=2)
    for call in (lambda: store.write("b", 0, b"s" * BS, fua=False, epoch=1),
                 lambda: store.write_buffered_nowait("b", 0, b"s" * BS, epoch=1),
                 lambda: store.zero("b", 0, BS, punch_hole=True, fua=False, epoch=1),
                 lambda: store.flush("b", epoch=1),
                 lambda: store.copy_local("b", "a", [CopyRange(0, 0, BS)], False, 1),
                 lambda: store.create("c", 8 * BS, BS, epoch=1),
                 lambda: store.delete("b", epoch=1)):
        with pytest.raises(FencedOut, match="epoch 1 is older than epoch 2 already seen; "
                                            "a newer controller took over"):
            call()
    assert store.read("b", 0, BS) == b"o" * BS
    assert [e.extent_id for e in store.list()] == ["a", "b"]
    assert {e.epoch for e in store.list()} == {2}


def test_fence_raises_the_epoch_for_every_extent_durably(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.create("a", 8 * BS, BS, epoch=1)
    store.create("b", 8 * BS, BS, epoch=1)
    assert store.fence.fence(5) == 5
    assert _node_file(tmp_path) == {"format": 1, "epoch": 5}
    assert store.fence.fence(5) == 5  # equal: a no-op
    with pytest.raises(FencedOut, match="epoch 4 is older than epoch 5"):
        store.fence.fence(4)
    with pytest.raises(InvalidArgument):
        store.fence.fence(0)
    store.close()
    reopened = open_store(tmp_path)
    try:
        for extent in ("a", "b"):
            with pytest.raises(FencedOut):
                reopened.write(extent, 0, b"x" * BS, fua=False, epoch=4)
        reopened.write("b", 0, b"y" * BS, fua=False, epoch=5)
        assert reopened.stat("a").epoch == 5
    finally:
        reopened.close()


class _SlowWrites:
    """Makes the next pwrite of the store stop in the middle until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = fileio.pwrite_all

        def slow(fd: int, data: bytes | memoryview, offset: int) -> None:
            if not self.entered.is_set():
                self.entered.set()
                assert self.release.wait(10)
            real(fd, data, offset)

        monkeypatch.setattr(fileio, "pwrite_all", slow)


def test_fence_returns_only_after_an_older_mutation_in_flight_has_landed(
        store: BlockStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create("a", 8 * BS, BS, epoch=1)
    store.create("b", 8 * BS, BS, epoch=1)
    slow = _SlowWrites(monkeypatch)
    outcome: dict[str, object] = {}

    def run(name: str, call: object) -> threading.Thread:
        def target() -> None:
            try:
                outcome[name] = call()  # type: ignore[operator]
            except Exception as exc:
                outcome[name] = exc
        thread = threading.Thread(target=target)
        thread.start()
        return thread

    in_flight = run("in flight", lambda: store.write("a", 0, b"o" * BS, fua=True, epoch=1))
    assert slow.entered.wait(5)  # checked against epoch 1, now writing
    fencing = run("fence", lambda: store.fence.fence(2))
    time.sleep(0.3)
    assert fencing.is_alive(), "Fence returned while an older write was still in flight"
    # A mutation that arrives while the Fence waits is refused after it, never lands.
    late = run("late", lambda: store.write("b", 0, b"l" * BS, fua=False, epoch=1))
    time.sleep(0.1)
    assert late.is_alive() and "late" not in outcome

    slow.release.set()
    for thread in (in_flight, fencing, late):
        thread.join(10)
    assert outcome["in flight"] == BS  # landed before the Fence returned
    assert outcome["fence"] == 2
    assert isinstance(outcome["late"], FencedOut)
    assert store.read("a", 0, BS) == b"o" * BS
    assert store.read("b", 0, BS) == bytes(BS)


def test_a_local_copy_is_admitted_batch_by_batch(
        store: BlockStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Fence during a long copy waits for one batch, and the rest of the copy is refused."""
    monkeypatch.setattr("agent.blockstore.COPY_BATCH_BYTES", BS)
    store.create("src", 8 * BS, BS, epoch=1)
    store.create("dst", 8 * BS, BS, epoch=1)
    store.write("src", 0, b"c" * 8 * BS, fua=False, epoch=1)
    real = fileio.copy_range
    batches: list[int] = []

    def fence_after_first_batch(src: int, dst: int, length: int, so: int, do: int) -> None:
        real(src, dst, length, so, do)
        batches.append(so)
        if len(batches) == 1:
            threading.Thread(target=store.fence.fence, args=(2,)).start()
            time.sleep(0.2)  # the Fence waits for this batch, then wins the gate

    monkeypatch.setattr(fileio, "copy_range", fence_after_first_batch)
    with pytest.raises(FencedOut):
        store.copy_local("dst", "src", [CopyRange(0, 0, 8 * BS)], False, 1)
    assert batches == [0]
    assert store.read("dst", 0, 2 * BS) == b"c" * BS + bytes(BS)


# -- validity ----------------------------------------------------------------------------------

def test_without_a_renewal_a_mutation_waits_fence_wait_then_fails_unavailable(
        tmp_path: Path) -> None:
    store = BlockStore(tmp_path, node_id="a1", fence_wait=0.3)  # never reached etcd
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            store.create("v1", 8 * BS, BS, epoch=1)
        assert 0.3 <= time.monotonic() - started < 2
        assert info.value.message.startswith("agent a1 has not reached etcd since it started ")
        assert info.value.message.endswith(
            "so it cannot prove that no newer controller took over; refusing writes until it "
            "does")
        assert store.list() == []
        # Raising the epoch needs no proof; an older epoch is refused at once, not after waiting.
        assert store.fence.fence(3) == 3
        started = time.monotonic()
        with pytest.raises(FencedOut):
            store.create("v1", 8 * BS, BS, epoch=2)
        assert time.monotonic() - started < 0.2
    finally:
        store.close()


def test_a_waiting_mutation_runs_once_a_renewal_proves_validity(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, node_id="a1", fence_wait=10)
    try:
        done = threading.Event()
        def create() -> None:
            store.create("v1", 8 * BS, BS, epoch=1)
            done.set()

        thread = threading.Thread(target=create)
        thread.start()
        assert not done.wait(0.3)
        store.fence.validity.proved(time.monotonic(), lease_ttl=10)
        assert done.wait(5)
        thread.join()
        assert [e.extent_id for e in store.list()] == ["v1"]
    finally:
        store.close()


def test_reads_are_served_while_mutations_are_refused(tmp_path: Path) -> None:
    first = open_store(tmp_path)
    first.create("v1", 8 * BS, BS, epoch=1)
    first.write("v1", 0, b"r" * BS, fua=True, epoch=1)
    first.close()
    store = BlockStore(tmp_path, node_id="a1", fence_wait=0)
    try:
        assert store.read("v1", 0, BS) == b"r" * BS
        assert store.stat("v1").epoch == 1
        assert store.write_buffered_nowait("v1", 0, b"w" * BS, epoch=1) is None
        with pytest.raises(Unavailable):
            store.write("v1", 0, b"w" * BS, fua=False, epoch=1)
        assert store.read("v1", 0, BS) == b"r" * BS
    finally:
        store.close()


def test_a_mutation_waiting_on_the_event_loop_holds_no_thread_and_wakes_on_a_renewal(
        tmp_path: Path) -> None:
    store = BlockStore(tmp_path, node_id="a1", fence_wait=10)

    async def scenario() -> None:
        threads = threading.active_count()
        waiting = asyncio.create_task(dispatch.mutate(
            store, 1, store.create, "v1", 8 * BS, BS, 1))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        assert threading.active_count() == threads  # no worker thread was taken
        threading.Thread(target=store.fence.validity.proved,
                         args=(time.monotonic(), 10)).start()
        info = await asyncio.wait_for(waiting, 5)
        assert info.extent_id == "v1"

    try:
        asyncio.run(scenario())
        store.fence.validity.lease_lost()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="lost its etcd lease"):
            asyncio.run(_with_wait(store, 0.2))
        assert 0.2 <= time.monotonic() - started < 2
    finally:
        store.close()


async def _with_wait(store: BlockStore, fence_wait: float) -> None:
    await store.fence.validity.wait_async(time.monotonic() + fence_wait)


def test_validity_ends_a_margin_before_the_lease_could_expire() -> None:
    now = [100.0]
    validity = Validity("a1", clock=lambda: now[0])
    assert not validity.valid()
    validity.proved(started=100.0, lease_ttl=10)  # margin 1 s
    now[0] = 108.99
    assert validity.valid()
    now[0] = 109.0
    assert not validity.valid()
    validity.proved(started=105.0, lease_ttl=10)  # an older cycle never shortens it
    validity.proved(started=104.0, lease_ttl=10)
    now[0] = 113.9
    assert validity.valid()
    assert validity_margin(2) == 0.5 and validity_margin(30) == 3.0


def test_a_lost_lease_ends_validity_at_once_and_says_so() -> None:
    now = [0.0]
    validity = Validity("a1", clock=lambda: now[0])
    validity.proved(started=0.0, lease_ttl=10)
    now[0] = 1.0
    validity.lease_lost()
    assert not validity.valid()
    now[0] = 3.5
    with pytest.raises(Unavailable, match=r"agent a1 lost its etcd lease 2\.5 s ago"):
        validity.wait(deadline=0.0)
    validity.proved(started=3.5, lease_ttl=10)
    assert validity.valid()


def test_after_close_nothing_is_admitted_and_waiters_give_up_at_once(store: BlockStore) -> None:
    store.create("v1", 8 * BS, BS, epoch=1)
    store.fence.close()
    started = time.monotonic()
    with pytest.raises(Unavailable, match="shutting down"):
        store.write("v1", 0, b"x" * BS, fua=False, epoch=1)
    assert time.monotonic() - started < 1
    store.fence.validity.proved(time.monotonic(), lease_ttl=10)  # too late: stays closed
    assert store.write_buffered_nowait("v1", 0, b"x" * BS, epoch=1) is None


# -- the node file -----------------------------------------------------------------------------

def _old_meta(data_dir: Path, extent_id: str, epoch: int, state: str) -> None:
    extents = data_dir / "extents"
    extents.mkdir(parents=True, exist_ok=True)
    (extents / f"{extent_id}.meta").write_text(json.dumps({
        "format": 1, "extent_id": extent_id, "size_bytes": 8 * BS, "block_size": BS,
        "epoch": epoch, "state": state}))
    if state == "live":
        with open(extents / f"{extent_id}.extent", "wb") as f:
            f.truncate(8 * BS)


def test_a_data_dir_without_node_file_starts_at_the_highest_epoch_of_its_extents(
        tmp_path: Path) -> None:
    # A data directory written by an agent with per-extent epochs.
    _old_meta(tmp_path, "v1", 3, "live")
    _old_meta(tmp_path, "v2", 6, "live")
    _old_meta(tmp_path, "gone", 8, "deleted")
    store = open_store(tmp_path)
    try:
        assert store.fence.epoch == 8
        assert _node_file(tmp_path) == {"format": 1, "epoch": 8}
        with pytest.raises(FencedOut):
            store.write("v2", 0, b"x" * BS, fua=False, epoch=7)
        store.write("v1", 0, b"x" * BS, fua=False, epoch=8)
        assert [(e.extent_id, e.epoch) for e in store.list()] == [("v1", 8), ("v2", 8)]
    finally:
        store.close()


def test_a_new_data_dir_starts_at_epoch_0(tmp_path: Path) -> None:
    store = open_store(tmp_path / "new")
    try:
        assert store.fence.epoch == 0
        assert _node_file(tmp_path / "new") == {"format": 1, "epoch": 0}
    finally:
        store.close()


@pytest.mark.parametrize("content", [b"{", b'{"format": 2, "epoch": 5}', b'{"format": 1}'])
def test_an_unreadable_node_file_stops_the_store_from_opening(
        tmp_path: Path, content: bytes) -> None:
    (tmp_path / NODE_FILE).write_bytes(content)
    with pytest.raises(StorageIOError, match="not a node file this agent understands"):
        BlockStore(tmp_path)


def test_raising_the_epoch_replaces_the_node_file_durably(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path)
    store.fence.fence(2)
    written: list[Path] = []
    real = fileio.write_file_durably

    def record(path: Path, data: bytes) -> None:
        written.append(path)
        real(path, data)

    monkeypatch.setattr(fileio, "write_file_durably", record)
    store.fence.fence(3)
    assert written == [tmp_path / NODE_FILE]
    assert not os.path.exists(tmp_path / (NODE_FILE + ".tmp"))
    store.close()
