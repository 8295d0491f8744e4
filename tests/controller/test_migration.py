"""A cluster written by the previous layout of etcd keys is migrated on the first start."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import zlib

import pytest

from controller.core import Core
from controller.placement import Placement
from tests.agent.conftest import REPO, Agent, AgentFactory
from tests.controller.conftest import ControllerFactory, agent_client, map_store
from tests.controller.test_daemon import qemu_io
from tests.support.etcd import EtcdServer
from volkin import etcd
from volkin.engine.persist import dump
from volkin.keys import Keys

pytestmark = pytest.mark.integration

MiB = 1 << 20
BLOCK = 65536


async def write_previous_layout(server: EtcdServer, a1: Agent, a2: Agent) -> None:
    """Volumes made by this version's core, then stored the way the previous version
    stored them: one topology value, one placement value, the same segment keys."""
    keys = Keys()
    client = await etcd.connect([server.endpoint])
    try:
        store = map_store(client, keys.prefix)
        # Width 1: one extent per memory, as placement was then.
        core = Core(await store.load(), store, Placement(["a1", "a2"], width=1),
                    agent_client(a1, a2), keys)
        for name, fill in (("V1", 0x11), ("V2", 0x22)):
            await core.create_volume(name, 4 * MiB, BLOCK)
            await core.write(name, 0, bytes([fill]) * 4 * MiB)
        await core.create_snapshot("V2", "S2")
        await core.write("V2", 0, b"\x33" * BLOCK)  # S2's block 0 is copied: a segment
        await core.start_refresh("V2", "V1")  # V2 reads through V1, S2 through V2's old node
        state = dump(core.engine)
        layouts = {m: core.placement.layout_of(m) for m in core.placement.memories()}
        extents = {m: [layout.nodes[0], layout.extent_id(0, 0)]
                   for m, layout in layouts.items() if layout is not None}
        await core.close()
        assert any(k.startswith(keys.maps) for k in await client.get_prefix(keys.prefix + "/"))
        for key in list(await client.get_prefix(keys.prefix + "/")):
            if not key.startswith((keys.maps, keys.agents, keys.prefix + "/controller/")):
                await client.delete(key)
        await client.put(keys.topology, json.dumps(
            {"topology": state.topology, "maps": state.maps}, sort_keys=True).encode())
        await client.put(keys.placement, json.dumps({"next": 1, "extents": extents}).encode())
        for (map_id, index), data in state.segments.items():
            await client.put(keys.map_segment(map_id, index), zlib.compress(data, 1))
    finally:
        await client.close()


def test_a_cluster_in_the_previous_layout_is_migrated_on_the_first_start(
        etcd_server: EtcdServer, start_agent: AgentFactory,
        start_controller: ControllerFactory) -> None:
    a1, a2 = start_agent("a1"), start_agent("a2")
    asyncio.run(write_previous_layout(etcd_server, a1, a2))
    c = start_controller("c1")
    assert "event=etcd.migrated" in c.log() and "volumes=3" in c.log()

    async def stored() -> dict[str, bytes]:
        client = await etcd.connect([etcd_server.endpoint])
        try:
            return await client.get_prefix("/volkin/")
        finally:
            await client.close()

    keys = asyncio.run(stored())
    assert "/volkin/topology" not in keys and "/volkin/placement" not in keys
    assert json.loads(keys["/volkin/layout"]) == {"layout": 2}
    assert {"/volkin/volumes/V1", "/volkin/volumes/V2", "/volkin/volumes/S2"} <= set(keys)
    assert sum(k.startswith("/volkin/extents/") for k in keys) == 3
    qemu_io(c.nbd, "V1", "read -P 0x11 0 4M")
    qemu_io(c.nbd, "V2", "read -P 0x11 0 4M")  # refreshed from V1
    qemu_io(c.nbd, "S2", "read -P 0x22 0 4M")  # V2's old contents, block 0 included
    qemu_io(c.nbd, "V2", "write -P 0x44 1M 64k")  # and it serves writes on the new layout
    c.stop()
    c.start()  # nothing left to migrate
    assert "event=etcd.migrated" not in c.log()
    qemu_io(c.nbd, "V2", "read -P 0x11 0 1M", "read -P 0x44 1M 64k")
    qemu_io(c.nbd, "S2", "read -P 0x22 0 4M")


def test_a_layout_from_a_newer_version_is_refused_with_what_to_do(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    start_agent("a1")

    async def newer() -> None:
        client = await etcd.connect([etcd_server.endpoint])
        try:
            await client.put("/volkin/layout", b'{"layout": 99}')
        finally:
            await client.close()

    asyncio.run(newer())
    result = subprocess.run(
        [sys.executable, "-m", "controller", "--node-id", "c1", "--etcd-endpoints",
         etcd_server.endpoint, "--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", "--lease-ttl", "2"], capture_output=True, text=True,
        timeout=60, cwd=REPO, check=False)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("volkin-controller: cannot start:") and "layout 99" in last, last
    assert "run the volkin version that wrote it" in last
