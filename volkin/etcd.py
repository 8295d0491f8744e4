"""etcd access behind a small interface, so the daemons depend on a contract, not a client.

`Etcd` is the contract; `connect()` returns the implementation on etcd3aio (see
docs/agent.md for why that client). Every method raises `EtcdUnavailable` when etcd
cannot be reached in time and `LeaseLost` when a lease it names has expired. A
write etcd refuses because its database reached its quota (the NOSPACE alarm)
raises `EtcdFull`, whose message tells the operator what to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import etcd3aio
import grpc

import volkin.tls
from volkin.errors import NotFound, StorageFull, Unavailable
from volkin.tls import CURRENT, Choice, Tls

# A page of `get_prefix`: few enough keys that a page of map segments (4 KiB each,
# at worst incompressible) stays well under gRPC's 4 MiB receive limit. A page of
# larger values that does not fit is asked for again with half as many keys.
PAGE_KEYS = 500
# What etcd says when a write would take its database past its quota
# (ErrGRPCNoSpace, status RESOURCE_EXHAUSTED), or while the NOSPACE alarm is on.
_NOSPACE = "database space exceeded"
_COMPACTED = "required revision has been compacted"


class EtcdUnavailable(Unavailable):
    """etcd did not answer in time; the call may or may not have taken effect."""


class EtcdFull(StorageFull, EtcdUnavailable):
    """etcd refused a write because its database is full (the NOSPACE alarm). Nothing
    was written, and no write that adds data will be until an operator frees space;
    reads, deletes and compaction still work.

    A `StorageFull`, so the admin API answers RESOURCE_EXHAUSTED and NBD answers
    ENOSPC. Also an `EtcdUnavailable`, so that code which waits out an etcd it cannot
    use (the leader election, an agent's registration) waits this out too instead of
    failing; whoever can tell a user (`controller.guarded`) catches it first."""

    ADVICE = ("compact and defragment etcd, or raise its --quota-backend-bytes, then "
              "clear the alarm with `etcdctl alarm disarm`; see docs/operations.md")


@dataclass(frozen=True)
class EtcdStatus:
    """One etcd member's view of its database."""

    revision: int  # the store's current revision
    db_size: int  # bytes of the database file: what the quota is checked against
    db_size_in_use: int  # bytes of it in use; the rest is free pages (0: not reported)
    db_size_quota: int = 0  # the member's --quota-backend-bytes (0: not reported, etcd < 3.5)


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

    async def revision(self) -> int:
        """etcd's current revision: the one its latest write created."""
        ...

    async def compact(self, revision: int) -> None:
        """Discards the history older than `revision`: from now on a read at an older
        revision fails. Does nothing if etcd compacted at or past it already."""
        ...

    async def status(self) -> EtcdStatus:
        """The database size and revision of the member this client talks to."""
        ...

    async def alarms(self) -> list[str]:
        """The alarms active on any member, by name ("NOSPACE", "CORRUPT"), sorted."""
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

    def __init__(self, endpoints: Sequence[str], timeout: float, tls: Tls | None) -> None:
        self._tls = tls
        self._generation = self._tls.generation if self._tls is not None else 0
        self._endpoint_list = list(endpoints)
        self._client = self._new_client()
        self._retired: set[asyncio.Task[None]] = set()
        self._timeout = timeout
        self._endpoints = ",".join(endpoints)

    def _new_client(self) -> etcd3aio.Etcd3Client:
        return etcd3aio.Etcd3Client(self._endpoint_list, rpc_max_attempts=2,
                                    **client_tls(self._endpoint_list, self._tls))

    async def _fresh(self) -> None:
        """Once the TLS files were renewed, calls go over a new channel that uses them;
        calls in flight finish on the old one, which is closed a little later."""
        if self._tls is None:
            return
        self._tls.material()
        if self._tls.generation == self._generation:
            return
        self._generation = self._tls.generation
        old, self._client = self._client, self._new_client()
        await self._client.connect()

        async def retire() -> None:
            await asyncio.sleep(2 * self._timeout)
            await old.close()

        task = asyncio.create_task(retire())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def open(self) -> None:
        await self._client.connect()

    def _failed(self, what: str, exc: BaseException) -> EtcdUnavailable:
        """The domain error for a failed call: `EtcdFull` if etcd refused it for want of
        space, else `EtcdUnavailable`."""
        if _is(exc, grpc.StatusCode.RESOURCE_EXHAUSTED, _NOSPACE):
            return EtcdFull(f"etcd's database is full (NOSPACE alarm, etcd at "
                            f"{self._endpoints}): {EtcdFull.ADVICE}")
        return EtcdUnavailable(f"etcd at {self._endpoints} did not answer {what}: "
                               f"{_one_line(exc)}")

    async def grant_lease(self, ttl: int) -> int:
        await self._fresh()
        assert self._client.lease is not None
        try:
            response = await self._client.lease.grant(ttl, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._failed("a lease grant", exc) from exc
        return int(response.ID)

    async def keep_alive(self, lease_id: int) -> int:
        await self._fresh()
        assert self._client.lease is not None
        stream = self._client.lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(self._timeout):
                async for response in stream:
                    if response.TTL <= 0:
                        raise LeaseLost(f"lease {lease_id:x} has expired")
                    return int(response.TTL)
        except (grpc.RpcError, TimeoutError) as exc:
            raise self._failed("a lease renewal", exc) from exc
        finally:
            stream.cancel()
        raise self._failed("a lease renewal", RuntimeError("stream closed"))

    async def revoke_lease(self, lease_id: int) -> None:
        await self._fresh()
        assert self._client.lease is not None
        try:
            await self._client.lease.revoke(lease_id, timeout=self._timeout)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise self._failed("a lease revoke", exc) from exc
        except (etcd3aio.EtcdError, TimeoutError) as exc:
            raise self._failed("a lease revoke", exc) from exc

    async def lease_ttl(self, lease_id: int) -> int:
        await self._fresh()
        assert self._client.lease is not None
        try:
            response = await self._client.lease.time_to_live(lease_id, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._failed("a lease query", exc) from exc
        return int(response.TTL)

    async def put(self, key: str, value: bytes, lease_id: int = 0) -> None:
        await self._fresh()
        assert self._client.kv is not None
        try:
            await self._client.kv.put(key, value, lease=lease_id, timeout=self._timeout)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.NOT_FOUND:
                raise LeaseLost(f"lease {lease_id:x} has expired") from exc
            raise self._failed(f"a put of {key}", exc) from exc
        except (etcd3aio.EtcdError, TimeoutError) as exc:
            raise self._failed(f"a put of {key}", exc) from exc

    async def get(self, key: str) -> bytes | None:
        await self._fresh()
        assert self._client.kv is not None
        try:
            response = await self._client.kv.get(key, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._failed(f"a get of {key}", exc) from exc
        return bytes(response.kvs[0].value) if response.kvs else None

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        # In pages, each starting after the last key of the one before, all read at the
        # revision of the first, so the result is one consistent snapshot whatever its
        # size. If that revision is compacted away meanwhile, it starts over.
        await self._fresh()
        kv = self._client.kv
        assert kv is not None
        end = etcd3aio.prefix_range_end(prefix)
        limit = PAGE_KEYS
        while True:
            out: dict[str, bytes] = {}
            start, revision = prefix.encode(), 0
            try:
                while True:
                    try:
                        response = await kv.get(start, end, revision=revision, limit=limit,
                                                timeout=self._timeout)
                    except grpc.aio.AioRpcError as exc:
                        # Too large for this client to receive: the same page, smaller.
                        if (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and limit > 1
                                and _NOSPACE not in (exc.details() or "")):
                            limit //= 2
                            continue
                        raise
                    revision = revision or int(response.header.revision)
                    for item in response.kvs:
                        out[item.key.decode()] = bytes(item.value)
                    if not response.more or not response.kvs:
                        return out
                    start = bytes(response.kvs[-1].key) + b"\0"
            except grpc.aio.AioRpcError as exc:
                if _is(exc, grpc.StatusCode.OUT_OF_RANGE, _COMPACTED):
                    continue
                raise self._failed(f"a get of {prefix}*", exc) from exc
            except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
                raise self._failed(f"a get of {prefix}*", exc) from exc

    async def delete(self, key: str) -> None:
        await self._fresh()
        assert self._client.kv is not None
        try:
            await self._client.kv.delete(key, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._failed(f"a delete of {key}", exc) from exc

    async def revision(self) -> int:
        await self._fresh()
        assert self._client.kv is not None
        try:  # any linearizable read reports the current revision in its header
            response = await self._client.kv.get(b"\0", count_only=True, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._failed("a revision query", exc) from exc
        return int(response.header.revision)

    async def compact(self, revision: int) -> None:
        await self._fresh()
        assert self._client.kv is not None
        try:
            await self._client.kv.compact(revision, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if _is(exc, grpc.StatusCode.OUT_OF_RANGE, _COMPACTED):
                return  # someone (another controller, etcd's own auto-compaction) was first
            raise self._failed(f"a compaction to revision {revision}", exc) from exc
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._failed(f"a compaction to revision {revision}", exc) from exc

    async def status(self) -> EtcdStatus:
        await self._fresh()
        assert self._client.maintenance is not None
        try:
            response = await self._client.maintenance.status(timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._failed("a status query", exc) from exc
        return EtcdStatus(revision=int(response.header.revision), db_size=int(response.dbSize),
                          db_size_in_use=int(response.dbSizeInUse),
                          db_size_quota=int(response.dbSizeQuota))

    async def alarms(self) -> list[str]:
        await self._fresh()
        assert self._client.maintenance is not None
        try:
            response = await self._client.maintenance.alarms(timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._failed("an alarm query", exc) from exc
        names: set[str] = set()
        for member in response.alarms:
            try:
                names.add(etcd3aio.AlarmType(member.alarm).name)
            except ValueError:
                names.add(f"ALARM_{member.alarm}")
        names.discard("NONE")
        return sorted(names)

    async def txn(self, *, if_values: Mapping[str, bytes] | None = None,
                  if_absent: Sequence[str] = (),
                  put: Mapping[str, bytes] | None = None,
                  delete: Sequence[str] = (), lease_id: int = 0) -> bool:
        await self._fresh()
        kv = self._client.kv
        assert kv is not None
        compare = [kv.txn_compare_value(k, v) for k, v in (if_values or {}).items()]
        compare += [kv.txn_compare_version(k, 0) for k in if_absent]
        success = [kv.txn_op_put(k, v, lease=lease_id) for k, v in (put or {}).items()]
        success += [kv.txn_op_delete(k) for k in delete]
        try:
            response = await kv.txn(compare, success, timeout=self._timeout)
        except (etcd3aio.EtcdError, grpc.RpcError, TimeoutError) as exc:
            raise self._failed(f"a transaction of {len(success)} operations", exc) from exc
        return bool(response.succeeded)

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        await self._client.close()


def _is(exc: BaseException, code: grpc.StatusCode, text: str) -> bool:
    """Whether `exc` is etcd's answer `code` with `text` in its details."""
    return (isinstance(exc, grpc.aio.AioRpcError) and exc.code() == code
            and text in (exc.details() or ""))


def client_tls(endpoints: Sequence[str], tls: Choice = CURRENT) -> dict[str, Any]:
    """etcd3aio's TLS arguments for `tls` (default: the process's; None: plaintext):
    the CA checks etcd's certificate, which must name the first endpoint's host, and
    the certificate and key are the client's (etcd's --client-cert-auth)."""
    tls = volkin.tls.chosen(tls)
    if tls is None:
        return {}
    m = tls.material()
    return {"ca_cert": m.ca, "cert_key": m.key, "cert_chain": m.cert,
            "tls_server_name": volkin.tls.server_host(endpoints[0])}


async def connect(endpoints: Sequence[str], timeout: float = 3.0,
                  tls: Choice = CURRENT) -> Etcd:
    """A client for the etcd cluster at `endpoints` (host:port), over mTLS with `tls`
    (default: the process's; None: plaintext). Does not wait for etcd."""
    client = _Etcd3aio(endpoints, timeout, volkin.tls.chosen(tls))
    await client.open()
    return client


def _one_line(exc: BaseException) -> str:
    """A failure in one line: a gRPC error's code and details, not its multi-line repr."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {' '.join((exc.details() or '').split())}"
    return " ".join(str(exc).split()) or type(exc).__name__
