"""Runs one agent: block store, gRPC server, health, metrics, etcd registration.

Start-up order: open the block store (and the node's fencing epoch), serve gRPC,
then register in etcd, so an agent that others discover can already answer. Reads
are served at once; mutations wait for the first registration cycle, which reads
the controller's epoch (agent/fencing.py). Shutdown (SIGTERM or SIGINT) runs the
other way: report NOT_SERVING, stop renewing, stop admitting mutations and wait for
those in flight, only then withdraw the registration (a new leader does not fence
an agent it does not find), let in-flight calls finish for `shutdown_grace`
seconds, then close the extents.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

import volkin.tls
from agent import peer
from agent.blockstore import BlockStore
from agent.config import AgentConfig, advertised_address
from agent.dataport import DataPort
from agent.metrics import AgentMetrics
from agent.registry import AgentRecord, Registration
from agent.service import SERVER_OPTIONS, BlockStoreService
from volkin import etcd
from volkin.api.v1 import agent_pb2, agent_pb2_grpc
from volkin.keys import Keys
from volkin.log import event

_log = logging.getLogger("agent.server")
SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["BlockStore"].full_name
VERSION = "0.1.0"
IO_THREADS = 32


async def serve(config: AgentConfig) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully."""
    # Copies and fua writes hold a worker thread while the device works; the
    # default pool (cores + 4) would let a few long copies starve everything else.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(IO_THREADS, thread_name_prefix="io"))
    tls = volkin.tls.from_settings(config.tls_ca, config.tls_cert, config.tls_key, "settings")
    volkin.tls.configure(tls)  # every channel of this process: etcd, peers, servers
    store = await asyncio.to_thread(BlockStore, config.data_dir, node_id=config.node_id,
                                    fence_wait=config.fence_wait)
    metrics = AgentMetrics()
    metrics.extents.set(store.count())
    metrics.watch_fence(store.fence)
    peers = peer.PeerChannels()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    agent_pb2_grpc.add_BlockStoreServicer_to_server(  # type: ignore[no-untyped-call]
        BlockStoreService(store, peers, metrics), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = volkin.tls.add_port(server, config.listen)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_address = metrics.serve(config.metrics_listen) if config.metrics_listen else ""
    address = advertised_address(config, port)
    data_port = DataPort(store, metrics, peers, tls)
    data_host, _, data_wanted = (config.data_listen or config.listen.rpartition(":")[0] + ":0"
                                 ).rpartition(":")
    bound = await data_port.start(data_host.strip("[]") or "0.0.0.0", int(data_wanted))
    data_address = f"{address.rpartition(':')[0]}:{bound}"

    client = await etcd.connect(config.etcd_endpoints)
    record = AgentRecord(config.node_id, address, metrics_address, os.getpid(), VERSION,
                         epoch=store.fence.epoch, lease_ttl=config.lease_ttl,
                         data_address=data_address)
    registration = Registration(client, Keys(config.etcd_prefix), record, store.fence)
    registering = asyncio.create_task(registration.run(), name="registration")
    event(_log, "agent.serving", node=config.node_id, address=address,
          metrics=metrics_address or "off", data_dir=config.data_dir, extents=store.count(),
          etcd=",".join(config.etcd_endpoints), epoch=store.fence.epoch, pid=os.getpid(),
          data=data_address, tls="on" if tls else "off")

    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()

    event(_log, "agent.stopping", node=config.node_id, grace=config.shutdown_grace)
    await health.enter_graceful_shutdown()
    registering.cancel()
    await asyncio.gather(registering, return_exceptions=True)
    try:
        await asyncio.wait_for(asyncio.to_thread(store.fence.close), config.shutdown_grace)
    except TimeoutError:
        # A mutation is still running (a stalled disk): keep the registration, so a new
        # leader still waits for this agent until the lease expires on its own.
        event(_log, "agent.mutations_still_running", logging.WARNING, node=config.node_id)
    else:
        await registration.withdraw()
    await server.stop(config.shutdown_grace)
    await data_port.stop()
    await peers.close()
    await client.close()
    metrics.stop()
    store.close()
    event(_log, "agent.stopped", node=config.node_id)
