"""Serving the CSI services of the configured mode on the unix socket until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import grpc

import volkin.tls
from volkin import nbdargs
from volkin.api.csi.v1 import csi_pb2_grpc
from volkin.csi import DRIVER_NAME, attach
from volkin.csi.admin import Admin
from volkin.csi.config import CsiConfig, socket_path
from volkin.csi.controller import ControllerService
from volkin.csi.identity import IdentityService
from volkin.csi.node import NodeService
from volkin.csi.state import StateDir
from volkin.log import event

_log = logging.getLogger("volkin.csi.server")
_GRACE = 5.0


async def serve(config: CsiConfig) -> None:
    tls = volkin.tls.from_settings(config.tls_ca, config.tls_cert, config.tls_key, "settings")
    volkin.tls.configure(tls)  # the admin API's channel
    # NBD clients (qemu-storage-daemon, nbd-client) read a directory of fixed names.
    tls_dir = nbdargs.linked_dir(*tls.paths, Path(config.state_dir) / "nbd-tls") if tls \
        else None
    admin = Admin(config.controller)
    server = grpc.aio.server()
    serves_controller = config.mode in ("controller", "all")
    csi_pb2_grpc.add_IdentityServicer_to_server(  # type: ignore[no-untyped-call]
        IdentityService(serves_controller, admin), server)
    if serves_controller:
        csi_pb2_grpc.add_ControllerServicer_to_server(  # type: ignore[no-untyped-call]
            ControllerService(admin, config.block_size, config.delete_wait), server)
    if config.mode in ("node", "all"):
        attacher = await attach.choose(config.attach, config.nbd, tls_dir)
        csi_pb2_grpc.add_NodeServicer_to_server(  # type: ignore[no-untyped-call]
            NodeService(config.node_id, admin, config.nbd, attacher,
                        StateDir(Path(config.state_dir))), server)
    path = socket_path(config.endpoint)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(path):  # a socket left by a driver that stopped
        os.unlink(path)
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    event(_log, "csi.serving", driver=DRIVER_NAME, endpoint=f"unix://{path}", mode=config.mode,
          node=config.node_id, controller=config.controller, pid=os.getpid(),
          tls="on" if tls else "off")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
        event(_log, "csi.stopping", node=config.node_id)
        await server.stop(_GRACE)
    finally:
        await server.stop(0)
        await admin.close()
        if os.path.exists(path):
            os.unlink(path)
