"""A full etcd (the NOSPACE alarm) is reported loudly, with what to do, instead of EIO.

Every test here runs against an etcd with a tiny quota (`--quota-backend-bytes`),
fills it, checks what each layer says, then frees it the way docs/operations.md
tells an operator to, and checks that writes work again.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import etcd3aio
import pytest

from controller.fence import Fence
from controller.guarded import GuardedEtcd
from controller.history import HistoryCompactor
from tests.agent.conftest import AgentFactory
from tests.cli.conftest import one_error_line, volkin
from tests.controller.conftest import ControllerFactory
from tests.support.etcd import EtcdServer
from tests.support.tls import cli_environment, qemu_nbd
from volkin import etcd
from volkin.errors import StorageFull
from volkin.rpc_status import status_of

pytestmark = pytest.mark.integration

MiB = 1 << 20
QUOTA = 4 * MiB
FILLER = "/fill/"


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd whose database may not grow past QUOTA (the agents and controllers of
    these tests use it too)."""
    server = EtcdServer(tmp_path / "etcd", args=["--quota-backend-bytes", str(QUOTA)])
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def fill(client: etcd.Etcd) -> etcd.EtcdFull:
    """Writes until etcd refuses; returns what it raised."""
    for i in range(10 * QUOTA // (256 * 1024)):
        try:
            await client.put(f"{FILLER}{i:04d}", bytes(256 * 1024))
        except etcd.EtcdFull as full:
            return full
    raise AssertionError("etcd never refused a write")


async def free(endpoint: str) -> None:
    """What docs/operations.md tells an operator to do: delete what filled it, compact,
    defragment, disarm the alarm."""
    raw = etcd3aio.Etcd3Client([endpoint], **etcd.client_tls([endpoint]))
    await raw.connect()
    try:
        assert raw.kv is not None and raw.maintenance is not None
        await raw.kv.delete(FILLER, etcd3aio.prefix_range_end(FILLER))
        revision = (await raw.kv.get("/", count_only=True)).header.revision
        await raw.kv.compact(revision, physical=True)
        await raw.maintenance.defragment()
        for alarm in (await raw.maintenance.alarms()).alarms:  # as `etcdctl alarm disarm`
            await raw.maintenance.alarm_deactivate(etcd3aio.AlarmType(alarm.alarm),
                                                   member_id=alarm.memberID)
    finally:
        await raw.close()


def etcd_events(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("etcd.") and r.levelno >= level]


def test_a_full_etcd_refuses_writes_with_one_line_that_says_what_to_do(
        etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        client = await etcd.connect([etcd_server.endpoint])
        try:
            await client.put("/t/kept", b"before")
            full = await fill(client)
            assert isinstance(full, StorageFull) and status_of(full).name == "RESOURCE_EXHAUSTED"
            message = full.message
            assert "\n" not in message and message.startswith("etcd's database is full")
            for advice in ("NOSPACE", "compact and defragment", "--quota-backend-bytes",
                           "etcdctl alarm disarm", "docs/operations.md"):
                assert advice in message
            assert await client.alarms() == ["NOSPACE"]
            # Nothing that adds data gets through, whatever the call...
            with pytest.raises(etcd.EtcdFull):
                await client.txn(put={"/t/other": b"x"})
            with pytest.raises(etcd.EtcdFull):
                await client.grant_lease(5)
            # ...but reads, deletes and compaction still work.
            assert await client.get("/t/kept") == b"before"
            assert "/t/kept" in await client.get_prefix("/t/")
            await client.delete("/t/kept")
            await client.compact(await client.revision())

            await free(etcd_server.endpoint)
            assert await client.alarms() == []
            await client.put("/t/kept", b"after")
            assert await client.get("/t/kept") == b"after"
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_guarded_transaction_fails_at_once_without_deposing_the_term(
        etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        client = await etcd.connect([etcd_server.endpoint])
        try:
            await client.put("/t/leader", b"me")
            fence = Fence.without_lease(guard={"/t/leader": b"me"})
            guarded = GuardedEtcd(client, fence, give_up_after=60.0)
            compactor = HistoryCompactor(client, fence)
            assert await guarded.txn({"/t/a": b"1"})
            await fill(client)
            with caplog.at_level(logging.INFO):
                for _ in range(3):  # not retried for give_up_after: at once, every time
                    started = time.monotonic()
                    with pytest.raises(etcd.EtcdFull, match="etcdctl alarm disarm"):
                        await guarded.txn({"/t/a": b"2"})
                    assert time.monotonic() - started < 1.0
                await compactor.compact_once()
                await compactor.compact_once()
            assert not fence.deposed and fence.valid()
            assert guarded.full
            # Loud, once: one error per episode from the writes, one from the compactor.
            assert etcd_events(caplog, logging.ERROR) == ["etcd.nospace", "etcd.alarm"]
            alarm = next(r for r in caplog.records if r.getMessage() == "etcd.alarm")
            assert alarm.levelno == logging.ERROR
            assert alarm.volkin_fields["alarms"] == "NOSPACE"  # type: ignore[attr-defined]

            await free(etcd_server.endpoint)
            caplog.clear()
            with caplog.at_level(logging.INFO):
                assert await guarded.txn({"/t/a": b"3"})
                await compactor.compact_once()
            assert await client.get("/t/a") == b"3"
            assert not guarded.full
            assert "etcd.space_available" in etcd_events(caplog)
            assert "etcd.alarm_cleared" in etcd_events(caplog)
        finally:
            await client.close()

    asyncio.run(scenario())


def qemu_io(nbd: str, volume: str, *commands: str) -> str:
    argv = ["qemu-io"]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run([*argv, *qemu_nbd(nbd, volume)], capture_output=True, text=True,
                          timeout=60, check=False)
    return done.stdout + done.stderr


def test_when_etcd_is_full_nbd_writes_get_enospc_and_the_cli_says_what_to_do(
        etcd_server: EtcdServer, start_agent: AgentFactory,
        start_controller: ControllerFactory) -> None:
    start_agent("a1")
    controller = start_controller("c1")
    env = {"VOLKIN_CONTROLLER": controller.admin, **cli_environment()}
    done = volkin("volume", "create", "v", "--size", "4MiB", env=env)
    assert done.returncode == 0, done.stderr
    written = qemu_io(controller.nbd, "v", "write -P 0x11 0 256k", "flush")
    assert "wrote" in written, written
    done = volkin("snapshot", "create", "v", "s", env=env)
    assert done.returncode == 0, done.stderr
    # A first write after the snapshot copies v's old block to s: s's extent exists now.
    assert "wrote" in qemu_io(controller.nbd, "v", "write -P 0x22 64k 64k")

    async def fill_it() -> None:
        client = await etcd.connect([etcd_server.endpoint])
        try:
            await fill(client)
        finally:
            await client.close()

    asyncio.run(fill_it())

    # Block 0 of v was not written since the snapshot: writing it needs a map commit
    # (V[s][0] = 1 after the copy), which etcd refuses.
    out = qemu_io(controller.nbd, "v", "write -P 0x33 0 64k")
    assert "No space left on device" in out, out
    checked = qemu_io(controller.nbd, "v", "read -P 0x11 0 64k", "read -P 0x22 64k 64k")
    assert "verification failed" not in checked and "read 65536" in checked, checked
    assert "verification failed" not in qemu_io(controller.nbd, "s", "read -P 0x11 0 128k")
    # The term goes on: what needs no write still works.
    listed = volkin("volume", "list", env=env)
    assert listed.returncode == 0 and {"v", "s"} <= set(listed.stdout.split()), listed.stderr
    assert "stepped_down" not in controller.log()

    line = one_error_line(volkin("volume", "create", "w", "--size", "1MiB", env=env))
    assert "etcd's database is full" in line and "etcdctl alarm disarm" in line, line
    assert "RESOURCE_EXHAUSTED" in line, line
    assert controller.log().count("event=etcd.nospace") == 1, controller.log()
    # Refused before the engine changed anything: the term goes on, reads too.
    assert "stepped_down" not in controller.log()
    assert "verification failed" not in qemu_io(controller.nbd, "s", "read -P 0x11 0 128k")

    # Freed as docs/operations.md says, everything works again.
    asyncio.run(free(etcd_server.endpoint))
    deadline = time.monotonic() + 30
    while volkin("volume", "create", "w", "--size", "1MiB", env=env).returncode != 0:
        assert time.monotonic() < deadline, controller.log()[-3000:]
        time.sleep(0.5)
    assert "wrote" in qemu_io(controller.nbd, "v", "write -P 0x33 0 64k")
    assert "verification failed" not in qemu_io(controller.nbd, "v", "read -P 0x33 0 64k")
    assert "verification failed" not in qemu_io(controller.nbd, "s", "read -P 0x11 0 128k")
