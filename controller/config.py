"""The controller's configuration: flags, then environment, then a TOML file, then defaults.

    flag --nbd-listen  ·  env VOLKIN_CONTROLLER_NBD_LISTEN  ·  file key nbd_listen
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller import placement
from volkin import config
from volkin.cli.sizes import parse_size
from volkin.errors import InvalidArgument

ENV_PREFIX = "VOLKIN_CONTROLLER_"


@dataclass(frozen=True)
class ControllerConfig:
    node_id: str
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    etcd_prefix: str = "/volkin"
    # host:port of the admin gRPC API; port 0 picks a free port.
    listen: str = "0.0.0.0:7470"
    # host:port of the NBD server; port 0 picks a free port.
    nbd_listen: str = "0.0.0.0:10809"
    # host:port of the Prometheus endpoint; empty disables it; port 0 picks one.
    metrics_listen: str = "127.0.0.1:9470"
    # Block size of new volumes unless they name one: the unit of maps and copies.
    block_size: int = 65536
    # How new volumes are striped unless they say: units of this many bytes (a power of
    # two, at least the block size) dealt over up to `stripe_width` agents.
    stripe_unit: int = placement.DEFAULT_UNIT
    stripe_width: int = placement.DEFAULT_WIDTH
    # The largest extent (one file on an agent): a column of a stripe larger than this
    # is cut into several. Recorded per memory: changing it affects new volumes only.
    extent_bytes: int = placement.DEFAULT_EXTENT_BYTES
    # Seconds before etcd drops the leadership of a controller that stopped renewing.
    lease_ttl: int = 10
    # Seconds an NBD request waits for an agent that is restarting, or for etcd, before
    # the client gets EIO.
    io_wait: float = 30.0
    # Seconds a background job keeps retrying an unreachable agent or etcd before it
    # fails (`volkin job resume` retries a failed job).
    job_fail_after: float = 3600.0
    # Background block copies started per second, all jobs together, while clients do
    # I/O (0: no such limit; at most two are in flight then either way).
    busy_copy_blocks: int = 100
    # Done and cancelled jobs kept (`volkin job list`); older ones are deleted from etcd,
    # so that a cluster that refreshes all day does not fill it (0: keep every one).
    job_history: int = 1000
    # Seconds between compactions of etcd's history by the active controller (0: never,
    # for an etcd that something else compacts).
    compact_every: float = 60.0
    shutdown_grace: float = 5.0
    # mTLS on every channel (volkin.tls): the cluster CA, this node's certificate and
    # key (PEM files); empty: VOLKIN_TLS_CA/_CERT/_KEY, and without those plaintext.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Admin API identities (client certificates' common names; `*` any): admins may
    # call everything, readers only what reads (controller.authz).
    tls_admins: tuple[str, ...] = ("*",)
    tls_readers: tuple[str, ...] = ("*",)
    log_level: str = "info"


_HELP = {
    "node_id": "unique name of this controller (default: host name)",
    "etcd_endpoints": "comma-separated etcd host:port list",
    "etcd_prefix": "etcd key prefix",
    "listen": "host:port of the admin gRPC API; port 0 picks a free port",
    "nbd_listen": "host:port of the NBD server; port 0 picks a free port",
    "metrics_listen": "host:port of the Prometheus endpoint; empty disables it",
    "block_size": "block size of new volumes in bytes (a power of two, 4KiB to 16MiB)",
    "stripe_unit": "stripe unit of new volumes in bytes (a power of two, 1MiB by default)",
    "stripe_width": "agents a new volume is striped over, at most (8 by default)",
    "extent_bytes": "largest extent an agent holds in one file (8TiB by default); a "
                    "volume's stripe on one agent is cut into extents of this size",
    "lease_ttl": "seconds before another controller may take over after this one stops",
    "io_wait": "seconds an NBD request waits for a restarting agent or etcd before EIO",
    "job_fail_after": "seconds a background job retries an unreachable agent or etcd "
                      "before it fails",
    "job_history": "done and cancelled jobs kept for `volkin job list`; older ones are "
                   "deleted (0: keep all)",
    "busy_copy_blocks": "background block copies started per second, all jobs together, "
                        "while clients do I/O (0: no limit)",
    "compact_every": "seconds between compactions of etcd's history while this controller "
                     "leads (0: never)",
    "shutdown_grace": "seconds in-flight calls get to finish on SIGTERM",
    "log_level": "debug, info, warning or error",
    **config.TLS_HELP,
}
_HELP.update({
    "tls_admins": "client certificate names (comma-separated, * for any) that may change "
                  "the cluster through the admin API",
    "tls_readers": "client certificate names (comma-separated, * for any) that may read "
                   "through the admin API",
})


def _convert(name: str, raw: Any) -> Any:
    if name == "etcd_endpoints":
        return config.endpoints(raw)
    if name in ("tls_admins", "tls_readers"):
        return names(raw)
    if name in ("lease_ttl", "block_size", "stripe_width"):
        return config.positive_int(raw)
    if name in ("stripe_unit", "extent_bytes"):
        try:
            size = parse_size(str(raw), "it")
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        if size < 4096 or size & (size - 1):
            raise ValueError("must be a power of two of at least 4KiB")
        return size
    if name in ("busy_copy_blocks", "job_history"):
        count = int(raw)
        if count < 0:
            raise ValueError("must be 0 (no limit) or a positive number")
        return count
    if name == "compact_every":
        value = float(raw)
        if not value >= 0:
            raise ValueError("must be 0 (never) or a positive number of seconds")
        return value
    if name in ("shutdown_grace", "io_wait", "job_fail_after"):
        value = float(raw)
        if value <= 0 and name != "shutdown_grace":
            raise ValueError("must be a positive number of seconds")
        return value
    return str(raw)


def names(raw: Any) -> tuple[str, ...]:
    """A comma-separated string (flag, env) or a list (file) of certificate names."""
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return tuple(str(n).strip() for n in items if str(n).strip())


def load(argv: Sequence[str], environ: Mapping[str, str]) -> ControllerConfig:
    """Builds the configuration; raises InvalidArgument with the offending setting."""
    chosen = config.load_settings(
        ControllerConfig, prog="volkin-controller",
        description="volkin controller: volumes, maps, NBD export and the admin API.",
        env_prefix=ENV_PREFIX, help=_HELP, convert=_convert, argv=argv, environ=environ)
    chosen.setdefault("node_id", socket.gethostname())
    settings = ControllerConfig(**chosen)
    config.check_address("listen", settings.listen)
    config.check_address("nbd_listen", settings.nbd_listen)
    config.check_address("metrics_listen", settings.metrics_listen, allow_empty=True)
    try:
        config.check_block_size(settings.block_size)
    except InvalidArgument as exc:
        raise InvalidArgument(f"setting block_size: {exc.message}") from None
    if settings.extent_bytes % settings.stripe_unit:
        raise InvalidArgument(f"setting extent_bytes={settings.extent_bytes} must be a "
                              f"multiple of stripe_unit={settings.stripe_unit}")
    config.tls_of(settings.tls_ca, settings.tls_cert, settings.tls_key, environ)
    if not settings.node_id or "/" in settings.node_id:
        raise InvalidArgument(f"node_id {settings.node_id!r} must be non-empty without '/'")
    return settings


def advertised(listen: str, bound_port: int) -> str:
    host = listen.rpartition(":")[0]
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{bound_port}"
