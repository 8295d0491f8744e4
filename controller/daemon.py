"""Runs one controller: leadership, maps, agents, jobs, the NBD export and the admin API.

Start-up: connect to etcd, become the active controller (or wait), load the
maps and the placement, resume jobs, then serve NBD and gRPC and say so in one
log line (`controller.serving admin=… nbd=…`). Shutdown (SIGTERM, SIGINT):
report NOT_SERVING, stop taking NBD connections, stop jobs (they resume from
the maps on the next start), let gRPC calls finish, release the leadership.
Losing the leadership (lease expired) stops the controller at once, with exit
code 1: a controller that may no longer be the leader must not serve.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from controller.config import ControllerConfig, advertised
from controller.core import Core
from controller.jobs import Jobs
from controller.leadership import Leadership
from controller.mapstore import MapStore
from controller.nbd.server import NbdServer
from controller.placement import Placement
from controller.service import AdminService
from volkin import etcd
from volkin.api.v1 import admin_pb2, admin_pb2_grpc
from volkin.errors import FencedOut
from volkin.log import event

_log = logging.getLogger("controller.daemon")
SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


class LeadershipLost(RuntimeError):
    pass


async def serve(config: ControllerConfig) -> None:
    prefix = config.etcd_prefix.rstrip("/")
    client = await etcd.connect(config.etcd_endpoints)
    leadership = Leadership(client, prefix, config.node_id, config.lease_ttl)
    await leadership.acquire()
    keeping = asyncio.create_task(leadership.keep(), name="leadership")
    try:
        await _lead(config, client, leadership)
    finally:
        keeping.cancel()
        await asyncio.gather(keeping, return_exceptions=True)
        # However this controller stops (even failing to bind its ports), the next one
        # must not wait out the lease.
        if not leadership.lost.is_set():
            await leadership.release()
        await client.close()


async def _lead(config: ControllerConfig, client: etcd.Etcd, leadership: Leadership) -> None:
    prefix = config.etcd_prefix.rstrip("/")
    guard = {leadership.key: leadership.value}

    async def agents() -> dict[str, str]:
        found = await client.get_prefix(f"{prefix}/agents/")
        records = [json.loads(raw) for raw in found.values()]
        return {str(r["node_id"]): str(r["address"]) for r in records}

    async def persist_placement(placement: Placement) -> None:
        if not await client.txn(if_values=guard, put={f"{prefix}/placement": placement.to_json()}):
            raise FencedOut("placement not stored: another controller took over")

    store = MapStore(client, prefix, guard=(leadership.key, leadership.value))
    engine = await store.load()
    placement = Placement(await agents())
    stored_placement = await client.get(f"{prefix}/placement")
    if stored_placement:
        placement.load_json(stored_placement)
    core = Core(engine, store, placement, leadership.epoch, persist_placement, agents)
    jobs = Jobs(core, client, prefix)
    await jobs.load()

    nbd = NbdServer(core)
    _, nbd_port = await nbd.start(*_split(config.nbd_listen))
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(  # type: ignore[no-untyped-call]
        AdminService(core, jobs, config.block_size), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(config.listen)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    admin_address = advertised(config.listen, port)
    nbd_address = advertised(config.nbd_listen, nbd_port)
    await client.txn(if_values=guard, lease_id=leadership.lease, put={
        f"{prefix}/controller/address": json.dumps(
            {"node_id": config.node_id, "admin": admin_address, "nbd": nbd_address,
             "pid": os.getpid()}).encode()})
    event(_log, "controller.serving", node=config.node_id, admin=admin_address,
          nbd=nbd_address, epoch=leadership.epoch, volumes=len(engine.graph.volumes),
          agents=len(placement.agents), pid=os.getpid())

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    lost = asyncio.create_task(leadership.lost.wait())
    stop = asyncio.create_task(stopping.wait())
    await asyncio.wait([lost, stop], return_when=asyncio.FIRST_COMPLETED)

    event(_log, "controller.stopping", node=config.node_id)
    await health.enter_graceful_shutdown()
    await nbd.stop()
    await jobs.stop()
    await server.stop(config.shutdown_grace)
    await core.close()
    event(_log, "controller.stopped", node=config.node_id)
    if leadership.lost.is_set():
        raise LeadershipLost("the leadership lease was lost; stopped serving")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
