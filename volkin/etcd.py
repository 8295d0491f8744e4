"""etcd access behind a small interface, so the daemons depend on a contract, not a client.

`Etcd` is the contract; `connect()` returns the implementation on etcd3aio (see
docs/agent.md for why that client). Every method raises `EtcdUnavailable` when etcd
cannot be reached in time and `LeaseLost` when a lease it names has expired.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Protocol

import etcd3aio
import grpc

from volkin.errors import NotFound, Unavailable


class EtcdUnavailable(Unavailable):
    """etcd did not answer in time; the call may or may not have taken effect."""


class LeaseLost(NotFound):
    """The lease expired or was revoked; keys attached to it are gone."""


class Etcd(Protocol):
    async def grant_lease(self, ttl: int) -> int:
        """Grants a lease that expires `ttl` seconds after its last renewal; returns its id."""
        ...

    async def keep_alive(self, lease_id: int) -> int:
        """Renews the lease once; returns its TTL in seconds, or raises LeaseLost."""
        ...

    async def revoke_lease(self, lease_id: int) -> None:
        """Revokes the lease, deleting every key attached to it at once."""
        ...

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on the lease, -1 if it has expired or never existed."""
        ...

    async def put(self, key: str, value: bytes, lease_id: int = 0) -> None:
        """Stores `value` at `key`, attached to the lease when `lease_id` is non-zero."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value at `key`, or None."""
        ...

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key that starts with `prefix`, with its value."""
        ...

    async def delete(self, key: str) -> None:
        """Deletes `key` if it exists."""
        ...

    async def txn(self, *, if_values: Mapping[str, bytes] | None = None,
                  if_absent: Sequence[str] = (),
                  put: Mapping[str, bytes] | None = None,
                  delete: Sequence[str] = (), lease_id: int = 0) -> bool:
        """Atomically: if every key in `if_values` holds exactly that value and no key
        in `if_absent` exists, stores `put` (attached to the lease when `lease_id` is
        non-zero) and deletes `delete`, all in one revision, and returns True; else
        changes nothing and returns False."""
        ...

    async def close(self) -> None:
        """Closes the connection; the client is unusable afterwards."""
        ...


class _Etcd3aio:
    """`Etcd` on etcd3aio (grpc.aio). Each call is bounded by `timeout` seconds."""

    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        self._client = etcd3aio.Etcd3Client(list(endpoints), rpc_max_attempts=2)
        self._timeout = timeout
        self._endpoints = ",".join(endpoints)

    async def open(self) -> None:
        await self._client.connect()

    def _unavailable(self, what: str, exc: BaseException) -> EtcdUnavailable:
        return EtcdUnavailable(f"etcd at {self._endpoints} did not answer {what}: {exc}")

    async def grant_lease(self, ttl: int) -> int:
        assert self._client.lease is not None
        try:
            response = await self._client.lease.grant(ttl, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._unavailable("a lease grant", exc) from exc
        return int(response.ID)

    async def keep_alive(self, lease_id: int) -> int:
        assert self._client.lease is not None
        stream = self._client.lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(self._timeout):
                async for response in stream:
                    if response.TTL <= 0:
                        raise LeaseLost(f"lease {lease_id:x} has expired")
                    return int(response.TTL)
        except (grpc.RpcError, TimeoutError) as exc:
            raise self._unavailable("a lease renewal", exc) from exc
        finally:
            stream.cancel()
        raise self._unavailable("a lease renewal", RuntimeError("stream closed"))

    async def revoke_lease(self, lease_id: int) -> None:
        assert self._client.lease is not None
        try:
            await self._client.lease.revoke(lease_id, timeout=self._timeout)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise self._unavailable("a lease revoke", exc) from exc
        except (etcd3aio.EtcdError, TimeoutError) as exc:
            raise self._unavailable("a lease revoke", exc) from exc

    async def lease_ttl(self, lease_id: int) -> int:
        assert self._client.lease is not None
        try:
            response = await self._client.lease.time_to_live(lease_id, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._unavailable("a lease query", exc) from exc
        return int(response.TTL)

    async def put(self, key: str, value: bytes, lease_id: int = 0) -> None:
        assert self._client.kv is not None
        try:
            await self._client.kv.put(key, value, lease=lease_id, timeout=self._timeout)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.NOT_FOUND:
                raise LeaseLost(f"lease {lease_id:x} has expired") from exc
            raise self._unavailable(f"a put of {key}", exc) from exc
        except (etcd3aio.EtcdError, TimeoutError) as exc:
            raise self._unavailable(f"a put of {key}", exc) from exc

    async def get(self, key: str) -> bytes | None:
        assert self._client.kv is not None
        try:
            response = await self._client.kv.get(key, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._unavailable(f"a get of {key}", exc) from exc
        return bytes(response.kvs[0].value) if response.kvs else None

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        assert self._client.kv is not None
        try:
            response = await self._client.kv.get(
                prefix, etcd3aio.prefix_range_end(prefix), timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._unavailable(f"a get of {prefix}*", exc) from exc
        return {kv.key.decode(): bytes(kv.value) for kv in response.kvs}

    async def delete(self, key: str) -> None:
        assert self._client.kv is not None
        try:
            await self._client.kv.delete(key, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._unavailable(f"a delete of {key}", exc) from exc

    async def txn(self, *, if_values: Mapping[str, bytes] | None = None,
                  if_absent: Sequence[str] = (),
                  put: Mapping[str, bytes] | None = None,
                  delete: Sequence[str] = (), lease_id: int = 0) -> bool:
        kv = self._client.kv
        assert kv is not None
        compare = [kv.txn_compare_value(k, v) for k, v in (if_values or {}).items()]
        compare += [kv.txn_compare_version(k, 0) for k in if_absent]
        success = [kv.txn_op_put(k, v, lease=lease_id) for k, v in (put or {}).items()]
        success += [kv.txn_op_delete(k) for k in delete]
        try:
            response = await kv.txn(compare, success, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._unavailable(f"a transaction of {len(success)} operations", exc) from exc
        return bool(response.succeeded)

    async def close(self) -> None:
        await self._client.close()


async def connect(endpoints: Sequence[str], timeout: float = 3.0) -> Etcd:
    """A client for the etcd cluster at `endpoints` (host:port). Does not wait for etcd."""
    client = _Etcd3aio(endpoints, timeout)
    await client.open()
    return client
