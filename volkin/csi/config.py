"""volkin-csi's configuration: flags, then environment, then a TOML file, then defaults.

    flag --node-id  ·  env VOLKIN_CSI_NODE_ID  ·  file key node_id
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from volkin import config
from volkin.errors import InvalidArgument

ENV_PREFIX = "VOLKIN_CSI_"
MODES = ("controller", "node", "all")
ATTACH = ("auto", "kernel", "fuse")


@dataclass(frozen=True)
class CsiConfig:
    # unix:///path/csi.sock (or a plain path) where the CO talks to the driver.
    endpoint: str
    # This node's name as the CO knows it (Kubernetes: the node name).
    node_id: str
    # host:port of the volkin controller's admin API.
    controller: str
    # host:port of the controller's NBD server (what `volkin dev up` prints as
    # VOLKIN_NBD); the node service attaches volumes from it.
    nbd: str = ""
    # Which CSI services to serve: the controller plugin, the node plugin or both.
    mode: str = "all"
    # Where the node keeps one record per staged volume, so that NodeUnstage after a
    # restart of the driver still detaches what it attached.
    state_dir: str = "/var/lib/volkin-csi"
    # How the node attaches an NBD export: auto (the kernel's NBD client where the kernel
    # has NBD, else qemu-storage-daemon's FUSE export and a loop device), kernel or fuse.
    attach: str = "auto"
    # Block size of new volumes whose StorageClass names none (bytes).
    block_size: int = 65536
    # Seconds DeleteVolume/DeleteSnapshot wait for the background copies that make the
    # volumes still reading through it independent, before answering FAILED_PRECONDITION.
    # Below the 10 s the Kubernetes sidecars give a call by default.
    delete_wait: float = 5.0
    log_level: str = "info"
    # mTLS to the controller's admin API and NBD server (volkin.tls); empty:
    # VOLKIN_TLS_CA/_CERT/_KEY, and without those plaintext.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""


_HELP = {
    "endpoint": "unix:///PATH/csi.sock: where the CO reaches the driver",
    "node_id": "this node's name as the CO knows it (default: host name)",
    "controller": "host:port of the volkin controller's admin API",
    "nbd": "host:port of the controller's NBD server (VOLKIN_NBD); needed by the node service",
    "mode": "controller, node or all: which CSI services to serve",
    "state_dir": "directory for the node's per-volume attach records",
    "attach": "auto, kernel or fuse: how the node attaches NBD exports",
    "block_size": "block size in bytes of new volumes whose StorageClass names none",
    "delete_wait": "seconds a delete waits for dependent volumes' copies before "
                   "FAILED_PRECONDITION",
    "log_level": "debug, info, warning or error",
    **config.TLS_HELP,
}


def _convert(name: str, raw: Any) -> Any:
    if name == "block_size":
        return config.positive_int(raw)
    if name == "delete_wait":
        value = float(raw)
        if not value >= 0:
            raise ValueError("must be 0 or a positive number of seconds")
        return value
    return str(raw)


def socket_path(endpoint: str) -> str:
    """The file path of a `unix://` endpoint (a plain path is taken as is)."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif "://" in endpoint:
        raise InvalidArgument(f"setting endpoint={endpoint!r}: only unix:// endpoints are served")
    else:
        path = endpoint
    if not path.startswith("/"):
        raise InvalidArgument(f"setting endpoint={endpoint!r}: the socket path must be absolute")
    return path


def load(argv: Sequence[str], environ: Mapping[str, str]) -> CsiConfig:
    """Builds the configuration; raises InvalidArgument with the offending setting."""
    chosen = config.load_settings(
        CsiConfig, prog="volkin-csi",
        description="volkin CSI driver: Kubernetes volumes, snapshots and clones on volkin.",
        env_prefix=ENV_PREFIX, help=_HELP, convert=_convert, argv=argv, environ=environ)
    chosen.setdefault("node_id", socket.gethostname())
    for required in ("endpoint", "controller"):
        if required not in chosen:
            raise InvalidArgument(f"setting {required} is required (--{required} or "
                                  f"{ENV_PREFIX}{required.upper()})")
    settings = CsiConfig(**chosen)
    socket_path(settings.endpoint)
    config.check_address("controller", settings.controller)
    if settings.mode not in MODES:
        raise InvalidArgument(f"setting mode={settings.mode!r} must be one of {', '.join(MODES)}")
    if settings.attach not in ATTACH:
        raise InvalidArgument(f"setting attach={settings.attach!r} must be one of "
                              f"{', '.join(ATTACH)}")
    if settings.mode != "controller" and not settings.nbd:
        raise InvalidArgument("setting nbd is required by the node service (--nbd HOST:PORT or "
                              f"{ENV_PREFIX}NBD; `volkin dev up` prints it as VOLKIN_NBD)")
    config.check_address("nbd", settings.nbd, allow_empty=True)
    try:
        config.check_block_size(settings.block_size)
    except InvalidArgument as exc:
        raise InvalidArgument(f"setting block_size: {exc.message}") from None
    if not settings.node_id:
        raise InvalidArgument("setting node_id must not be empty")
    config.tls_of(settings.tls_ca, settings.tls_cert, settings.tls_key, environ)
    return settings
