"""Runs one controller process: listens, waits to lead, serves a term, steps down, again.

Start-up: connect to etcd, bind the admin gRPC port and the NBD port (a standby
answers UNAVAILABLE on the first and NBD_REP_ERR_SHUTDOWN on the second, and
reports NOT_SERVING), log `controller.listening`. Then, as long as the process
runs: become the active controller (or wait as a standby), begin a term (fence
every agent, load the maps, resume jobs; see `controller.term`), attach it to
the NBD server and the admin API, publish the addresses and log
`controller.serving`. When the term's fence is deposed (the lease expired, an
agent or etcd saw a newer controller), the term ends in place: NBD connections
are closed without answering what is in flight, jobs stop, and the process is
a standby again (`controller.stepped_down`). SIGTERM or SIGINT: report
NOT_SERVING, close NBD, stop jobs, let gRPC calls finish, release the
leadership so that a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

import volkin.tls
from controller.authz import Authorizer
from controller.config import ControllerConfig, advertised
from controller.leadership import Leadership
from controller.mapstore import LayoutError
from controller.metrics import ControllerMetrics
from controller.nbd.server import NbdServer
from controller.scrape import TermState
from controller.service import AdminService
from controller.status import ClusterSurvey
from controller.term import Term
from controller.volumes import CoreDevice
from volkin import etcd
from volkin.api.v1 import admin_pb2, admin_pb2_grpc
from volkin.errors import VolkinError
from volkin.keys import Keys
from volkin.log import event

_log = logging.getLogger("controller.daemon")
SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


async def serve(config: ControllerConfig) -> None:
    tls = volkin.tls.from_settings(config.tls_ca, config.tls_cert, config.tls_key, "settings")
    volkin.tls.configure(tls)  # every channel of this process: etcd, agents, servers
    keys = Keys(config.etcd_prefix)
    client = await etcd.connect(config.etcd_endpoints)
    leadership = Leadership(client, keys, config.node_id, config.lease_ttl)
    metrics = ControllerMetrics()
    nbd = NbdServer(io_wait=config.io_wait, metrics=metrics.nbd, tls=tls)
    state = TermState(asyncio.get_running_loop(), nbd)
    metrics.registry.register(state)
    survey = ClusterSurvey(client, keys)
    admin = AdminService(nbd, config.block_size, config.node_id, survey)
    server = grpc.aio.server(interceptors=[Authorizer(config.tls_admins, config.tls_readers)])
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)  # type: ignore[no-untyped-call]
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        _, nbd_port = await nbd.start(*_split(config.nbd_listen))
        port = volkin.tls.add_port(server, config.listen)
        await server.start()
        await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        metrics_address = metrics.serve(config.metrics_listen) if config.metrics_listen else ""
        addresses = {"admin": advertised(config.listen, port),
                     "nbd": advertised(config.nbd_listen, nbd_port)}
        event(_log, "controller.listening", node=config.node_id, admin=addresses["admin"],
              nbd=addresses["nbd"], metrics=metrics_address or "off", pid=os.getpid(),
              tls="on" if tls else "off")

        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        while not stopping.is_set():
            await _one_term(config, client, keys, leadership, nbd, admin, health, addresses,
                            stopping, metrics, state)
        event(_log, "controller.stopping", node=config.node_id)
        await health.enter_graceful_shutdown()
        await nbd.stop()
        await server.stop(config.shutdown_grace)
        event(_log, "controller.stopped", node=config.node_id)
    finally:
        await leadership.release()  # the next controller must not wait out the lease
        await nbd.stop()
        await server.stop(0)
        metrics.stop()
        await survey.close()
        await client.close()


async def _one_term(config: ControllerConfig, client: etcd.Etcd, keys: Keys,
                    leadership: Leadership, nbd: NbdServer, admin: AdminService,
                    health: HealthServicer, addresses: dict[str, str],
                    stopping: asyncio.Event, metrics: ControllerMetrics,
                    state: TermState) -> None:
    """Waits to lead, serves one term until it ends or the process stops."""
    acquiring = asyncio.create_task(leadership.acquire())
    stop = asyncio.create_task(stopping.wait())
    await asyncio.wait([acquiring, stop], return_when=asyncio.FIRST_COMPLETED)
    if not acquiring.done():
        acquiring.cancel()
        await asyncio.gather(acquiring, return_exceptions=True)
        return
    stop.cancel()
    fence = acquiring.result()
    keeping = asyncio.create_task(leadership.keep(fence), name="leadership")
    term: Term | None = None
    try:
        try:
            term = await Term.begin(config, client, keys, fence, metrics)
        except LayoutError:
            raise  # not a passing fault: this version must not serve this cluster
        except VolkinError as exc:
            event(_log, "controller.term_failed", logging.ERROR, node=config.node_id,
                  epoch=fence.epoch, error=exc.message)
            fence.depose(f"the term could not begin: {exc.message}")
            await leadership.release()
            await asyncio.sleep(1.0)
            return
        nbd.attach(CoreDevice(term.core))
        admin.attach(term)
        state.attach(term)
        await term.etcd.put(keys.controller_address, json.dumps(
            {"node_id": config.node_id, **addresses, "pid": os.getpid()}).encode(),
            lease_id=leadership.lease)
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        core = term.core
        event(_log, "controller.serving", node=config.node_id, admin=addresses["admin"],
              nbd=addresses["nbd"], epoch=fence.epoch, volumes=len(core.engine.graph.volumes),
              agents=len(core.agents.directory.records), pid=os.getpid())
        stop = asyncio.create_task(stopping.wait())
        await asyncio.wait([keeping, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
    except LayoutError:
        raise
    except VolkinError as exc:  # deposed while starting to serve
        event(_log, "controller.term_failed", logging.ERROR, node=config.node_id,
              epoch=fence.epoch, error=exc.message)
    finally:
        await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        nbd.detach()
        admin.detach()
        state.detach()
        if stopping.is_set():
            fence.depose("the controller is stopping")
        if term is not None:
            await term.end()
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping
        if fence.reason and not stopping.is_set():
            event(_log, "controller.stepped_down", logging.WARNING, node=config.node_id,
                  epoch=fence.epoch, reason=fence.reason)
            await leadership.release()


async def _set_health(health: HealthServicer,
                      status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
    for name in ("", SERVICE_NAME):
        await health.set(name, status)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
