"""The `volkin.etcd.Etcd` contract, against a real etcd: what both daemons rely on."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.etcd import EtcdServer, etcd_server
from volkin import etcd

__all__ = ["etcd_server"]
pytestmark = pytest.mark.integration


def test_keys_values_and_prefixes(etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        client = await etcd.connect([etcd_server.endpoint])
        try:
            await client.put("/t/a", b"1")
            await client.put("/t/b", b"2")
            await client.put("/u/c", b"3")
            assert await client.get("/t/a") == b"1"
            assert await client.get("/t/none") is None
            assert await client.get_prefix("/t/") == {"/t/a": b"1", "/t/b": b"2"}
            await client.delete("/t/a")
            assert await client.get_prefix("/t/") == {"/t/b": b"2"}
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_lease_keeps_its_keys_while_renewed_and_drops_them_when_revoked(
        etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        client = await etcd.connect([etcd_server.endpoint])
        try:
            lease = await client.grant_lease(2)
            await client.put("/t/leased", b"x", lease)
            for _ in range(4):  # 3 s of renewals: longer than the TTL
                assert await client.keep_alive(lease) == 2
                await asyncio.sleep(0.75)
            assert await client.get("/t/leased") == b"x"
            assert 0 < await client.lease_ttl(lease) <= 2
            await client.revoke_lease(lease)
            assert await client.get("/t/leased") is None
            assert await client.lease_ttl(lease) == -1
            with pytest.raises(etcd.LeaseLost):
                await client.keep_alive(lease)
            with pytest.raises(etcd.LeaseLost):
                await client.put("/t/leased", b"y", lease)
        finally:
            await client.close()

    asyncio.run(scenario())


def test_an_unreachable_etcd_is_reported_in_bounded_time(etcd_server: EtcdServer) -> None:
    etcd_server.stop()

    async def scenario() -> None:
        client = await etcd.connect([etcd_server.endpoint], timeout=1.0)
        try:
            start = time.monotonic()
            with pytest.raises(etcd.EtcdUnavailable, match="did not answer"):
                await client.put("/t/a", b"1")
            assert time.monotonic() - start < 5
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_transaction_applies_all_or_nothing_by_its_compare(etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        client = await etcd.connect([etcd_server.endpoint])
        try:
            await client.put("/x/owner", b"me")
            await client.put("/x/old", b"1")
            assert await client.txn(if_values={"/x/owner": b"me"},
                                    put={"/x/a": b"A", "/x/b": b"B"}, delete=["/x/old"])
            assert await client.get_prefix("/x/") == {
                "/x/owner": b"me", "/x/a": b"A", "/x/b": b"B"}
            assert not await client.txn(if_values={"/x/owner": b"you"},
                                        put={"/x/c": b"C"}, delete=["/x/a"])
            assert await client.get_prefix("/x/") == {
                "/x/owner": b"me", "/x/a": b"A", "/x/b": b"B"}
            assert not await client.txn(if_absent=["/x/a"], put={"/x/a": b"again"})
            assert await client.txn(if_absent=["/x/new"], put={"/x/new": b"N"})
            assert await client.get("/x/a") == b"A" and await client.get("/x/new") == b"N"
        finally:
            await client.close()

    asyncio.run(scenario())
