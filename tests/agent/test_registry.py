"""The registration cycle in process, against an etcd double: what proves validity, and when.

Real etcd, real agents: test_agent_registration.py and test_agent_fencing.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from agent.blockstore import BlockStore
from agent.registry import AgentRecord, Registration, parse_epoch
from volkin.errors import VolkinError
from volkin.etcd import EtcdStatus, EtcdUnavailable, LeaseLost
from volkin.keys import Keys

KEYS = Keys("/volkin")


class FakeEtcd:
    """Just what the registration uses; `fail` makes the named call raise once set."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.fail: dict[str, Exception] = {}
        self.calls: list[str] = []
        self.leases = 0

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]

    async def grant_lease(self, ttl: int) -> int:
        self._call("grant")
        self.leases += 1
        return self.leases

    async def keep_alive(self, lease_id: int) -> int:
        self._call("keep_alive")
        return 2

    async def revoke_lease(self, lease_id: int) -> None:
        self._call("revoke")

    async def lease_ttl(self, lease_id: int) -> int:
        return 2

    async def put(self, key: str, value: bytes, lease_id: int = 0) -> None:
        self._call(f"put {key}")
        self.data[key] = value

    async def get(self, key: str) -> bytes | None:
        self._call(f"get {key}")
        return self.data.get(key)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.data.items() if k.startswith(prefix)}

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def txn(self, *, if_values: Mapping[str, bytes] | None = None,
                  if_absent: Sequence[str] = (), put: Mapping[str, bytes] | None = None,
                  delete: Sequence[str] = (), lease_id: int = 0) -> bool:
        raise NotImplementedError

    async def revision(self) -> int:
        raise NotImplementedError

    async def compact(self, revision: int) -> None:
        raise NotImplementedError

    async def status(self) -> EtcdStatus:
        raise NotImplementedError

    async def alarms(self) -> list[str]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


def _record(ttl: int = 2) -> AgentRecord:
    return AgentRecord("a1", "127.0.0.1:1", "", 1, "0", epoch=0, lease_ttl=ttl)


async def _cycles(registration: Registration, etcd: FakeEtcd, n: int) -> None:
    """Runs the loop until it has renewed or granted `n` times."""
    task = asyncio.create_task(registration.run())
    try:
        while sum(c in ("grant", "keep_alive") for c in etcd.calls) < n + 1:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_renewal_proves_validity_only_after_the_epoch_it_read_is_recorded(
        tmp_path: Path) -> None:
    store = BlockStore(tmp_path, node_id="a1")
    etcd = FakeEtcd()
    etcd.data[KEYS.epoch] = b"7"
    valid_when_raised: list[bool] = []
    real_raise = store.fence.raise_to

    def raise_to(epoch: int, by: str) -> int:
        valid_when_raised.append(store.fence.validity.valid())
        return real_raise(epoch, by)

    store.fence.raise_to = raise_to  # type: ignore[method-assign]
    registration = Registration(etcd, KEYS, _record(), store.fence)
    asyncio.run(_cycles(registration, etcd, 1))
    assert valid_when_raised == [False]
    assert store.fence.epoch == 7
    assert store.fence.validity.valid()
    assert etcd.calls[:3] == ["grant", "put /volkin/agents/a1", "get /volkin/controller/epoch"]
    record = json.loads(etcd.data["/volkin/agents/a1"])
    assert (record["epoch"], record["lease_ttl"]) == (7, 2)
    store.close()


@pytest.mark.parametrize(("failure", "value"), [
    (EtcdUnavailable("etcd did not answer"), b"3"),
    (None, b"three"),
])
def test_a_renewal_whose_epoch_read_fails_proves_nothing(
        tmp_path: Path, failure: Exception | None, value: bytes) -> None:
    store = BlockStore(tmp_path, node_id="a1")
    etcd = FakeEtcd()
    etcd.data[KEYS.epoch] = value
    if failure is not None:
        etcd.fail[f"get {KEYS.epoch}"] = failure
    registration = Registration(etcd, KEYS, _record(ttl=1), store.fence)
    asyncio.run(_cycles(registration, etcd, 2))
    assert "keep_alive" in etcd.calls  # the lease itself was renewed
    assert not store.fence.validity.valid()
    assert store.fence.epoch == 0
    store.close()


def test_a_lost_lease_ends_validity_until_a_new_lease_is_granted(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, node_id="a1")
    etcd = FakeEtcd()
    registration = Registration(etcd, KEYS, _record(ttl=3), store.fence)

    async def scenario() -> None:
        task = asyncio.create_task(registration.run())
        while not store.fence.validity.valid():
            await asyncio.sleep(0.01)
        etcd.fail["keep_alive"] = LeaseLost("lease 1 has expired")
        etcd.fail["grant"] = EtcdUnavailable("etcd did not answer")
        while etcd.calls.count("grant") < 2:
            await asyncio.sleep(0.01)
        assert not store.fence.validity.valid()  # though its window had 1.5 s left
        del etcd.fail["grant"]
        while not store.fence.validity.valid():
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert etcd.leases == 2
    store.close()


def test_the_record_is_put_again_when_the_node_epoch_changes(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, node_id="a1")
    etcd = FakeEtcd()
    registration = Registration(etcd, KEYS, _record(ttl=1), store.fence)

    async def scenario() -> None:
        task = asyncio.create_task(registration.run())
        while not store.fence.validity.valid():
            await asyncio.sleep(0.01)
        assert json.loads(etcd.data[KEYS.agent("a1")])["epoch"] == 0
        await asyncio.to_thread(store.fence.fence, 4)  # a controller's Fence RPC
        deadline = time.monotonic() + 5
        while json.loads(etcd.data[KEYS.agent("a1")])["epoch"] != 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    store.close()


def test_the_epoch_key_is_a_decimal_number_and_absent_means_0() -> None:
    assert parse_epoch(None) == 0
    assert parse_epoch(b"12") == 12
    for bad in (b"", b"-1", b"x", b"\xff"):
        with pytest.raises(VolkinError, match="not a decimal number"):
            parse_epoch(bad)
