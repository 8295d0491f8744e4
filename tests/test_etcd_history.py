"""The `Etcd` contract at scale, against a real etcd: prefixes larger than a gRPC message,
the revision, compaction, the database size and alarms."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import etcd3aio
import grpc
import pytest

from tests.support.etcd import EtcdServer, etcd_server
from volkin import etcd

__all__ = ["etcd_server"]
pytestmark = pytest.mark.integration

GRPC_RECEIVE_LIMIT = 4 * 1024 * 1024


def run(server: EtcdServer, scenario: Callable[[etcd.Etcd, etcd3aio.Etcd3Client],
                                               Awaitable[None]]) -> None:
    """Runs `scenario` with volkin's client and a raw etcd3aio one (to look behind it)."""
    async def main() -> None:
        client = await etcd.connect([server.endpoint])
        raw = etcd3aio.Etcd3Client([server.endpoint], **etcd.client_tls([server.endpoint]))
        await raw.connect()
        try:
            await scenario(client, raw)
        finally:
            await raw.close()
            await client.close()

    asyncio.run(main())


async def put_many(client: etcd.Etcd, items: dict[str, bytes], per_txn: int = 100) -> None:
    keys = sorted(items)
    for i in range(0, len(keys), per_txn):
        assert await client.txn(put={k: items[k] for k in keys[i:i + per_txn]})


def test_a_prefix_larger_than_a_grpc_message_is_read_whole_in_pages(
        etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd, raw: etcd3aio.Etcd3Client) -> None:
        items = {f"/big/{i:06d}": os.urandom(100).hex().encode() for i in range(40_000)}
        assert sum(len(k) + len(v) for k, v in items.items()) > 1.8 * GRPC_RECEIVE_LIMIT
        await put_many(client, items)
        # Neighbours that share the prefix's first bytes but not the prefix.
        await client.put("/bif", b"outside")
        await client.put("/bih", b"outside")
        assert raw.kv is not None
        with pytest.raises(grpc.aio.AioRpcError) as one_message:  # what a single read meets
            await raw.kv.get("/big/", etcd3aio.prefix_range_end("/big/"))
        assert one_message.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await client.get_prefix("/big/") == items

    run(etcd_server, scenario)


def test_a_page_of_values_too_large_for_one_message_is_asked_for_again_smaller(
        etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd, raw: etcd3aio.Etcd3Client) -> None:
        items = {f"/large/{i:02d}": os.urandom(1 << 20) for i in range(10)}  # 10 MiB
        for key, value in items.items():
            await client.put(key, value)
        assert await client.get_prefix("/large/") == items

    run(etcd_server, scenario)


def test_a_paged_read_is_one_snapshot_and_starts_over_if_its_revision_is_compacted(
        etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd, "PAGE_KEYS", 2)

    async def scenario(client: etcd.Etcd, raw: etcd3aio.Etcd3Client) -> None:
        await put_many(client, {f"/p/{i}": b"old" for i in range(6)})
        inner = client._client.kv  # type: ignore[attr-defined]
        real_get = inner.get
        pages = 0
        compact = False

        async def get(*args: object, **kwargs: object) -> object:
            # After the first page: a change; after the second, maybe a compaction past
            # the revision the first page was read at.
            nonlocal pages
            pages += 1
            response = await real_get(*args, **kwargs)
            if pages == 1:
                await client.put("/p/5", b"new")
            if pages == 2 and compact:
                await client.compact(await client.revision())
            return response

        monkeypatch.setattr(inner, "get", get)
        assert await client.get_prefix("/p/") == {f"/p/{i}": b"old" for i in range(6)}
        assert pages == 3

        pages, compact = 0, True
        got = await client.get_prefix("/p/")
        assert got == {**{f"/p/{i}": b"old" for i in range(5)}, "/p/5": b"new"}
        assert pages > 3  # it started over after the compaction

    run(etcd_server, scenario)


def test_revision_status_and_alarms_describe_the_store(etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd, raw: etcd3aio.Etcd3Client) -> None:
        before = await client.revision()
        await client.put("/s/a", b"x" * 1000)
        assert await client.revision() == before + 1
        status = await client.status()
        assert status.revision == before + 1
        assert status.db_size >= status.db_size_in_use > 0
        assert await client.alarms() == []

    run(etcd_server, scenario)


def test_compaction_discards_older_revisions_and_repeating_it_is_harmless(
        etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd, raw: etcd3aio.Etcd3Client) -> None:
        assert raw.kv is not None and raw.maintenance is not None
        await client.put("/c/a", b"1")
        old = await client.revision()
        await client.put("/c/a", b"2")
        assert (await raw.kv.get("/c/a", revision=old)).kvs[0].value == b"1"
        await client.compact(await client.revision())
        with pytest.raises(grpc.aio.AioRpcError) as compacted:
            await raw.kv.get("/c/a", revision=old)
        assert compacted.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert await client.get("/c/a") == b"2"
        await client.compact(old)  # older than what is compacted already: nothing happens
        assert (await raw.maintenance.hash_kv()).compact_revision == old + 1

    run(etcd_server, scenario)
