"""Agents register in etcd under a lease: visible while alive, gone soon after they die."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from tests.agent.conftest import (
    LEASE_TTL,
    AgentFactory,
    MiB,
    create,
    etcd_agents,
    expect_status,
    read,
    wait_until,
    write,
)
from tests.support.etcd import EtcdServer
from volkin import etcd as volkin_etcd

pytestmark = pytest.mark.integration


def _lease_of(etcd_server: EtcdServer, key: str) -> int:
    async def fetch() -> int:
        client = await volkin_etcd.connect([etcd_server.endpoint])
        try:
            assert isinstance(client, volkin_etcd._Etcd3aio)
            assert client._client.kv is not None
            response = await client._client.kv.get(key)
            return int(response.kvs[0].lease) if response.kvs else 0
        finally:
            await client.close()

    return asyncio.run(fetch())


def _lease_ttl(etcd_server: EtcdServer, lease: int) -> int:
    async def fetch() -> int:
        client = await volkin_etcd.connect([etcd_server.endpoint])
        try:
            return await client.lease_ttl(lease)
        finally:
            await client.close()

    return asyncio.run(fetch())


@pytest.mark.slow
def test_agents_register_and_a_killed_one_expires_with_its_lease(
        start_agent: AgentFactory, etcd_server: EtcdServer) -> None:
    a1, a2 = start_agent("a1"), start_agent("a2")
    wait_until(lambda: len(etcd_agents(etcd_server)) == 2, 5, "both agents register")
    record = json.loads(etcd_agents(etcd_server)["/volkin/agents/a1"])
    assert record["address"] == a1.address
    assert record["metrics_address"] == a1.metrics_address
    assert a1.process is not None and record["pid"] == a1.process.pid

    time.sleep(2 * LEASE_TTL)  # renewals keep it alive well past one TTL
    assert set(etcd_agents(etcd_server)) == {"/volkin/agents/a1", "/volkin/agents/a2"}

    a2.kill()
    killed_at = time.monotonic()
    wait_until(lambda: "/volkin/agents/a2" not in etcd_agents(etcd_server), 3 * LEASE_TTL + 2,
               "the killed agent's lease expires")
    assert time.monotonic() - killed_at >= LEASE_TTL - 1  # it went with the lease, not before
    assert "/volkin/agents/a1" in etcd_agents(etcd_server)


def test_sigterm_withdraws_the_registration_at_once(
        start_agent: AgentFactory, etcd_server: EtcdServer) -> None:
    a1 = start_agent("a1")
    wait_until(lambda: "/volkin/agents/a1" in etcd_agents(etcd_server), 5, "a1 registers")
    assert a1.stop() == 0
    assert "/volkin/agents/a1" not in etcd_agents(etcd_server)
    assert "event=agent.deregistered" in a1.log()


@pytest.mark.slow
def test_registration_survives_an_etcd_restart(
        start_agent: AgentFactory, etcd_server: EtcdServer) -> None:
    a1 = start_agent("a1")
    wait_until(lambda: "/volkin/agents/a1" in etcd_agents(etcd_server), 5, "a1 registers")
    etcd_server.restart(down_for=LEASE_TTL + 1)  # down longer than one TTL
    wait_until(lambda: "/volkin/agents/a1" in etcd_agents(etcd_server), 10,
               "a1 is registered after etcd is back")
    time.sleep(3 * LEASE_TTL)  # the lease would have expired unless a1 renews it
    assert "/volkin/agents/a1" in etcd_agents(etcd_server)
    assert _lease_ttl(etcd_server, _lease_of(etcd_server, "/volkin/agents/a1")) > 0
    assert "event=agent.etcd_unreachable" in a1.log()
    assert "event=agent.etcd_reachable" in a1.log()


def test_an_agent_registers_again_when_its_lease_is_revoked(
        start_agent: AgentFactory, etcd_server: EtcdServer) -> None:
    start_agent("a1")
    wait_until(lambda: "/volkin/agents/a1" in etcd_agents(etcd_server), 5, "a1 registers")
    lease = _lease_of(etcd_server, "/volkin/agents/a1")

    async def revoke() -> None:
        client = await volkin_etcd.connect([etcd_server.endpoint])
        try:
            await client.revoke_lease(lease)
        finally:
            await client.close()

    asyncio.run(revoke())
    assert "/volkin/agents/a1" not in etcd_agents(etcd_server)
    wait_until(lambda: "/volkin/agents/a1" in etcd_agents(etcd_server), 3 * LEASE_TTL,
               "a1 registers again under a new lease")
    assert _lease_of(etcd_server, "/volkin/agents/a1") not in (0, lease)


def test_an_agent_started_while_etcd_is_down_serves_reads_and_refuses_mutations(
        start_agent: AgentFactory, etcd_server: EtcdServer) -> None:
    a1 = start_agent("a1", "--fence-wait", "1")
    create(a1, "v1", MiB)
    write(a1, "v1", 0, b"r" * 4096)
    a1.stop()
    etcd_server.stop()
    a1.start()  # serving does not wait for etcd
    assert read(a1, "v1", 0, 4096) == b"r" * 4096
    message = expect_status(grpc.StatusCode.UNAVAILABLE,
                            lambda: write(a1, "v1", 0, b"w" * 4096))
    assert "has not reached etcd since it started" in message
    etcd_server.restart()
    wait_until(lambda: "/volkin/agents/a1" in etcd_agents(etcd_server), 10,
               "a1 registers once etcd is up")
    write(a1, "v1", 0, b"w" * 4096)  # waits for the first renewal at most
    assert read(a1, "v1", 0, 4096) == b"w" * 4096
