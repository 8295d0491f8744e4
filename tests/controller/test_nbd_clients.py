"""Volumes served over NBD to real clients (qemu-io, qemu-img, nbdinfo), agents and etcd real.

The refresh test is the product in one picture: V2 becomes a copy of V1 the
moment the refresh starts, S2 keeps V2's old contents, and qemu-io reads and
writes all three while the background copy runs.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import tempfile
from collections.abc import Awaitable, Callable

import pytest

from controller.core import Core
from controller.guarded import GuardedEtcd
from controller.jobs import Jobs, JobState
from controller.nbd.server import NbdServer
from controller.placement import Placement
from controller.volumes import CoreDevice
from tests.agent.conftest import AgentFactory
from tests.controller.conftest import agent_client, map_store
from tests.support.etcd import EtcdServer
from volkin import etcd
from volkin.keys import Keys

pytestmark = pytest.mark.integration

MiB = 1 << 20
BLOCK = 64 * 1024


async def tool(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    text = out.decode()
    assert process.returncode == 0, f"{argv} exited {process.returncode}:\n{text}"
    return text


async def qemu_io(url: str, *commands: str) -> str:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    text = await tool(*argv, url)
    assert "verification failed" not in text, text
    return text


async def libnbd(url: str, body: str, before: str = "") -> list[str]:
    """The lines printed by `body`, run with libnbd's handle `h` connected to `url` after
    `before` ran (Debian's python3-libnbd, hence Debian's python)."""
    script = f"import sys, nbd\nh = nbd.NBD()\n{before}h.connect_uri(sys.argv[1])\n{body}"
    return (await tool("/usr/bin/python3", "-c", script, url)).split("\n")


def serve(etcd_server: EtcdServer, start_agent: AgentFactory,
          scenario: Callable[[Core, Jobs, str], Awaitable[None]]) -> None:
    a1, a2 = start_agent("a1"), start_agent("a2")

    async def main() -> None:
        client = await etcd.connect([etcd_server.endpoint])
        store = map_store(client)
        core = Core(await store.load(), store, Placement(["a1", "a2"]), agent_client(a1, a2),
                    Keys("/t"))
        server = NbdServer(CoreDevice(core))
        host, port = await server.start()
        try:
            jobs = Jobs(core, GuardedEtcd(client, core.fence), Keys("/t"))
            await scenario(core, jobs, f"nbd://{host}:{port}")
        finally:
            await server.stop()
            await core.close()
            await client.close()

    asyncio.run(main())


def test_exports_are_listed_and_described_to_nbdinfo(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        await core.create_volume("alpha", 8 * MiB, BLOCK)
        await core.create_volume("beta", 4 * MiB, BLOCK)
        listing = await tool("nbdinfo", "--list", "--json", base)
        names = {e["export-name"]: e for e in json.loads(listing)["exports"]}
        assert set(names) == {"alpha", "beta"}
        info = json.loads(await tool("nbdinfo", "--json", f"{base}/beta"))
        export = info["exports"][0]
        assert export["export-size"] == 4 * MiB
        assert export["can_flush"] and export["can_fua"] and export["can_zero"]
        assert not export["is_read_only"]

    serve(etcd_server, start_agent, scenario)


def test_qemu_io_writes_read_back_at_any_alignment(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        await core.create_volume("v", 4 * MiB, BLOCK)
        url = f"{base}/v"
        await qemu_io(url, "write -P 0x11 0 1M", "write -P 0x22 100000 3333",
                      "write -z 2M 128k", "flush")
        await qemu_io(url, "read -P 0x11 0 100000", "read -P 0x22 100000 3333",
                      "read -P 0x11 103333 945243", "read -P 0 2M 128k", "read -P 0 3M 1M")
        direct = await core.read("v", 100000, 3333)
        assert direct == b"\x22" * 3333

    serve(etcd_server, start_agent, scenario)


def test_a_request_past_the_end_is_an_error_and_changes_nothing(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        await core.create_volume("v", 1 * MiB, BLOCK)
        url = f"{base}/v"
        await qemu_io(url, "write -P 0x33 0 1M")
        # libnbd with its own range checks off, so that the request reaches the server.
        out = await libnbd(url, before="h.set_strict_mode(0)\n", body=(
            "for call in (lambda: h.pwrite(b'x' * 4096, (1 << 20) - 2048),\n"
            "             lambda: h.pread(4096, (1 << 20) - 2048)):\n"
            "    try:\n"
            "        call()\n"
            "        print('accepted')\n"
            "    except nbd.Error as e:\n"
            "        print('refused', e.errno)\n"))
        assert out[:2] == ["refused ENOSPC", "refused EINVAL"], out
        await qemu_io(url, "read -P 0x33 0 1M")

    serve(etcd_server, start_agent, scenario)


def test_refresh_is_instant_over_nbd_and_all_three_volumes_stay_writable(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        size = 8 * MiB
        await core.create_volume("V1", size, BLOCK)
        await core.create_volume("V2", size, BLOCK)
        await qemu_io(f"{base}/V1", "write -P 0x01 0 8M")
        await qemu_io(f"{base}/V2", "write -P 0x02 0 8M")
        await core.create_snapshot("V2", "S2")
        job = await jobs.start_refresh("V2", "V1", rate=0)
        await jobs.pause(job.id)

        # At once, before the copy goes on: V2 reads as V1, S2 as the old V2.
        await qemu_io(f"{base}/V2", "read -P 0x01 0 8M")
        await qemu_io(f"{base}/S2", "read -P 0x02 0 8M")

        await jobs.resume(job.id)
        await qemu_io(f"{base}/V1", "write -P 0x11 1M 1M")
        await qemu_io(f"{base}/V2", "write -P 0x22 3M 1M")
        await qemu_io(f"{base}/S2", "write -P 0x33 5M 1M")
        while jobs.get(job.id).state is not JobState.DONE:
            assert jobs.get(job.id).state is JobState.RUNNING, jobs.get(job.id)
            await asyncio.sleep(0.05)
        assert jobs.blocks_done(jobs.get(job.id)) == 128
        assert core.engine.info("V2").source is None  # real: no longer reads through V1

        await qemu_io(f"{base}/V1", "read -P 0x01 0 1M", "read -P 0x11 1M 1M",
                      "read -P 0x01 2M 6M")
        await qemu_io(f"{base}/V2", "read -P 0x01 0 3M", "read -P 0x22 3M 1M",
                      "read -P 0x01 4M 4M")
        await qemu_io(f"{base}/S2", "read -P 0x02 0 5M", "read -P 0x33 5M 1M",
                      "read -P 0x02 6M 2M")
        # A whole-export copy by another client (nbdcopy) agrees with qemu-io.
        with tempfile.TemporaryDirectory() as scratch:
            image = pathlib.Path(scratch) / "v2.raw"
            await tool("nbdcopy", f"{base}/V2", str(image))
            assert image.read_bytes() == b"\x01" * 3 * MiB + b"\x22" * MiB + b"\x01" * 4 * MiB

    serve(etcd_server, start_agent, scenario)


def test_zeroes_and_trims_of_any_length_and_block_sizes_clients_accept(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        size = 96 * MiB
        await core.create_volume("v", size, BLOCK)
        await core.create_volume("big", 32 * MiB, 16 * MiB)
        url = f"{base}/v"
        await qemu_io(url, f"write -P 0x44 0 {size}")
        await core.create_snapshot("v", "s")  # each zeroed block is copied to s first
        # 64 MiB in one request each: more than any READ or WRITE may carry (32 MiB).
        await qemu_io(url, "write -z 1000 64M", "discard 1000 64M", "flush")
        await qemu_io(url, "read -P 0x44 0 1000", "read -P 0 1000 64M",
                      f"read -P 0x44 {64 * MiB + 1000} {32 * MiB - 1000}")
        await qemu_io(f"{base}/s", f"read -P 0x44 0 {size}")
        for name, preferred in (("v", BLOCK), ("big", 16 * MiB)):
            info = json.loads(await tool("nbdinfo", "--json", f"{base}/{name}"))
            export = info["exports"][0]
            assert (export["block_size_minimum"], export["block_size_preferred"],
                    export["block_size_maximum"]) == (1, preferred, 32 * MiB)
            assert export["can_cache"] and export["can_fast_zero"] and export["can_multi_conn"]

    serve(etcd_server, start_agent, scenario)


def test_a_sparse_image_is_copied_in_by_nbdcopy(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        size = 80 * MiB
        await core.create_volume("v", size, BLOCK)
        await qemu_io(f"{base}/v", f"write -P 0x55 0 {size}")
        with tempfile.TemporaryDirectory() as work:
            image = pathlib.Path(work) / "sparse.raw"
            with open(image, "wb") as f:  # data, a hole of 70 MiB, data
                f.write(b"\x66" * MiB)
                f.seek(71 * MiB)
                f.write(b"\x77" * (9 * MiB))
            # nbdcopy zeroes the hole with requests larger than 32 MiB.
            await tool("nbdcopy", "--flush", str(image), f"{base}/v")
            await tool("nbdcopy", f"{base}/v", str(pathlib.Path(work) / "back.raw"))
            assert (pathlib.Path(work) / "back.raw").read_bytes() == image.read_bytes()

    serve(etcd_server, start_agent, scenario)


def test_fast_zero_cache_fua_and_the_older_newstyle_handshake_with_libnbd(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        await core.create_volume("v", 4 * MiB, BLOCK)
        url = f"{base}/v"
        await qemu_io(url, "write -P 0x11 0 4M")
        # No FIXED_NEWSTYLE: the client may send NBD_OPT_EXPORT_NAME only.
        out = await libnbd(url, before="h.set_handshake_flags(0)\n", body=(
            "print('fixed' if h.get_handshake_flags() & 1 else 'older')\n"
            "h.cache(1 << 20, 0)\n"
            "h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)\n"
            "try:\n"
            "    h.zero(1000, 3 << 20, nbd.CMD_FLAG_FAST_ZERO)\n"
            "    print('unaligned fast zero accepted')\n"
            "except nbd.Error as e:\n"
            "    print('unaligned fast zero', e.errno)\n"
            "h.set_strict_mode(0)\n"
            "h.pread(4096, 0, nbd.CMD_FLAG_FUA)\n"
            "print('read with fua')\n"
            "h.shutdown()\n"))
        assert out[:3] == ["older", "unaligned fast zero ENOTSUP", "read with fua"], out
        await qemu_io(url, "read -P 0x11 0 1M", "read -P 0 1M 1M", "read -P 0x11 2M 2M")

    serve(etcd_server, start_agent, scenario)


def test_block_status_shows_holes_to_nbdinfo_and_qemu_img_keeps_them(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        await core.create_volume("v", 8 * MiB, BLOCK)
        url = f"{base}/v"
        await qemu_io(url, "write -P 0x11 1M 1M", "write -P 0x22 5M 64k")
        await core.create_snapshot("v", "s")  # reads through v: the same map
        for name in ("v", "s"):
            mapped = json.loads(await tool("nbdinfo", "--map", "--json", f"{base}/{name}"))
            runs = [(m["offset"], m["length"], m["type"]) for m in mapped]
            assert runs == [(0, MiB, 3), (MiB, MiB, 0), (2 * MiB, 3 * MiB, 3),
                            (5 * MiB, 64 * 1024, 0), (5 * MiB + 64 * 1024,
                                                      3 * MiB - 64 * 1024, 3)], (name, runs)
        with tempfile.TemporaryDirectory() as work:
            out = pathlib.Path(work) / "out.raw"
            await tool("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out))
            assert out.stat().st_size == 8 * MiB
            assert out.stat().st_blocks * 512 <= 2 * MiB  # only the data was written
            data = out.read_bytes()
            assert data[MiB:2 * MiB] == b"\x11" * MiB and data[:MiB] == bytes(MiB)
            assert data[5 * MiB:5 * MiB + 65536] == b"\x22" * 65536

    serve(etcd_server, start_agent, scenario)


def test_reads_and_errors_with_structured_replies_on_and_off(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        await core.create_volume("v", 4 * MiB, BLOCK)
        url = f"{base}/v"
        await qemu_io(url, "write -P 0x33 0 4M")
        for structured in ("True", "False"):
            out = await libnbd(url, before=f"h.set_request_structured_replies({structured})\n",
                               body=(
                "print(h.get_structured_replies_negotiated())\n"
                "print(h.pread(65536, 4096) == b'\\x33' * 65536)\n"
                "h.set_strict_mode(0)\n"
                "try:\n"
                "    h.pread(4096, (4 << 20) - 2048)\n"
                "except nbd.Error as e:\n"
                "    print('refused', e.errno)\n"))
            assert out[:3] == [structured, "True", "refused EINVAL"], out

    serve(etcd_server, start_agent, scenario)


def test_trim_gives_back_whole_blocks_after_preserving_them_for_a_snapshot(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        await core.create_volume("v", 4 * MiB, BLOCK)
        url = f"{base}/v"
        await qemu_io(url, "write -P 0x44 0 4M")
        await core.create_snapshot("v", "s")
        # 100000..300000 covers blocks 2 and 3 whole; the parts of blocks 1 and 4 stay.
        await qemu_io(url, "discard 1M 2M", "discard 100000 200000")
        await qemu_io(url, "read -P 0x44 0 131072", "read -P 0 131072 131072",
                      "read -P 0x44 262144 786432", "read -P 0 1M 2M", "read -P 0x44 3M 1M")
        await qemu_io(f"{base}/s", "read -P 0x44 0 4M")  # preserved before the trim
        mapped = json.loads(await tool("nbdinfo", "--map", "--json", url))
        holes = [(m["offset"], m["length"]) for m in mapped if m["type"] == 3]
        assert holes == [(131072, 131072), (MiB, 2 * MiB)], mapped

    serve(etcd_server, start_agent, scenario)


async def finished(jobs: Jobs, job_id: str) -> None:
    while jobs.get(job_id).state is not JobState.DONE:
        assert jobs.get(job_id).state is JobState.RUNNING, jobs.get(job_id)
        await asyncio.sleep(0.05)


async def holes(url: str) -> list[tuple[int, int]]:
    mapped = json.loads(await tool("nbdinfo", "--map", "--json", url))
    return [(m["offset"], m["length"]) for m in mapped if m["type"] == 3]


def test_refresh_and_materialize_keep_the_holes_of_their_source(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        size = 32 * MiB
        await core.create_volume("thin1", size, BLOCK)
        await core.create_volume("thin2", size, BLOCK)
        # Their stripes start on different agents: every block's copy crosses agents.
        assert core.placement.nodes_of(core.engine.volume("thin1").memory) == ["a1", "a2"]
        assert core.placement.nodes_of(core.engine.volume("thin2").memory) == ["a2", "a1"]
        await qemu_io(f"{base}/thin1", "write -P 0x61 4M 64k")
        await qemu_io(f"{base}/thin2", f"write -P 0x62 0 {size}")  # all of it allocated
        everything_but_4m = [(0, 4 * MiB), (4 * MiB + 65536, size - 4 * MiB - 65536)]
        # Across agents: thin2's blocks where thin1 has holes become holes, not zeros.
        job = await jobs.start_refresh("thin2", "thin1", rate=0)
        await finished(jobs, job.id)
        assert await holes(f"{base}/thin2") == everything_but_4m
        assert await core.allocated_bytes("thin2") < MiB  # 64 KiB and file system metadata
        await qemu_io(f"{base}/thin2", "read -P 0 0 4M", "read -P 0x61 4M 64k")
        # On one agent (copy_file_range): a snapshot made real keeps thin1's holes too.
        await core.create_snapshot("thin1", "snap")
        await qemu_io(f"{base}/thin1", f"write -P 0x63 0 {size}")
        job = await jobs.start_materialize("snap", rate=0)
        await finished(jobs, job.id)
        assert core.engine.info("snap").source is None  # real now: its own memory
        assert await holes(f"{base}/snap") == everything_but_4m
        await qemu_io(f"{base}/snap", "read -P 0 0 4M", "read -P 0x61 4M 64k")

    serve(etcd_server, start_agent, scenario)


def test_a_sparse_tib_is_refreshed_and_made_real_in_work_that_grows_with_its_data(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    """16 Mi blocks, 64 MiB of data: the copies go in runs (`controller.copywork`), so the
    etcd transactions, the agents' calls and the space allocated follow the data and the
    map segments, not the 16 Mi blocks a block-by-block copy would commit one by one."""
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        size = 1 << 40
        await core.create_volume("big1", size, BLOCK)
        await core.create_volume("big2", size, BLOCK)
        written = ["write -P 0x71 0 16M", "write -P 0x72 300G 16M", "write -P 0x73 700G 31M",
                   f"write -P 0x74 {size - MiB} 1M"]
        await qemu_io(f"{base}/big1", *written)
        await qemu_io(f"{base}/big2", "write -P 0x75 100G 8M")  # old data: punched, not kept
        before = core.store.transactions
        job = await jobs.start_refresh("big2", "big1", rate=0)
        await finished(jobs, job.id)
        assert core.engine.info("big2").source is None
        assert core.store.transactions - before < 2000  # one per run, not per block (2^24)
        # 64 MiB, and a few blocks of the file systems' extent trees on the agents.
        assert 64 * MiB <= await core.allocated_bytes("big2") < 65 * MiB
        await qemu_io(f"{base}/big2", "read -P 0x71 0 16M", "read -P 0x72 300G 16M",
                      "read -P 0x73 700G 31M", f"read -P 0x74 {size - MiB} 1M",
                      "read -P 0 100G 8M", "read -P 0 16M 1M")
        # A snapshot of it, made real while big2 changes, holds only what big2 held.
        await core.create_snapshot("big2", "snap")
        await qemu_io(f"{base}/big2", "write -P 0x76 0 1M")  # preserved into snap first
        job = await jobs.start_materialize("snap", rate=0)
        await finished(jobs, job.id)
        assert core.engine.info("snap").source is None
        assert 64 * MiB <= await core.allocated_bytes("snap") < 65 * MiB
        await qemu_io(f"{base}/snap", "read -P 0x71 0 16M", "read -P 0x73 700G 31M",
                      f"read -P 0x74 {size - MiB} 1M")

    serve(etcd_server, start_agent, scenario)


def test_nbdcopy_of_a_sparse_image_zeroes_its_holes_without_a_plan_per_block(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    """nbdcopy zeroes every hole of its source in the destination (WRITE_ZEROES): blocks
    that already read as zeros are left alone, so 256 GiB of holes (4 Mi blocks) cost no
    commit. (Before, every block got a plan and its M bit a commit: a 1 TiB image failed
    with EIO after --io-wait.)"""
    async def scenario(core: Core, jobs: Jobs, base: str) -> None:
        size = 256 << 30
        await core.create_volume("dst", size, BLOCK)
        await qemu_io(f"{base}/dst", "write -P 0x41 200G 1M")  # will be zeroed: a hole there
        with tempfile.TemporaryDirectory() as scratch:
            image = pathlib.Path(scratch) / "sparse.raw"
            with open(image, "wb") as out:
                out.truncate(size)
                out.seek(100 << 30)
                out.write(b"\x42" * MiB)
            before = core.store.transactions
            await tool("nbdcopy", "--flush", str(image), f"{base}/dst")
        assert core.store.transactions - before < 50  # the 1 MiB and the MiB at 200G
        await qemu_io(f"{base}/dst", "read -P 0x42 100G 1M", "read -P 0 200G 1M",
                      "read -P 0 0 1M")
        # The copied MiB, and the MiB at 200G zeroed in place (WRITE_ZEROES keeps space).
        assert await core.allocated_bytes("dst") <= 2 * MiB + 64 * 1024

    serve(etcd_server, start_agent, scenario)
