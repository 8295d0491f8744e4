"""Mutual TLS for every channel: one CA, one certificate and key per process.

Both daemons and the CLI take the same three settings (`tls_ca`, `tls_cert`,
`tls_key`: PEM files). With them, every server asks for and checks a client
certificate signed by the CA, and every client checks that the server's
certificate is signed by the CA and names the host it dialled. Without them
everything is plaintext, as before.

The files are read again when they change (checked at most once a second, on the
next handshake), so a renewed certificate takes effect without a restart: gRPC
servers fetch it through `dynamic_ssl_server_credentials`, the `ssl.SSLContext`s
of the NBD server and the block data ports load it in place, and clients open new
channels with it (`Tls.generation` tells them when).

`Tls.check()` is what a process runs at start-up: a missing file, a key that does
not belong to the certificate, or a certificate that expired gives one readable
line (`InvalidArgument`), not a handshake failure later.
"""

from __future__ import annotations

import datetime
import os
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from volkin.errors import InvalidArgument

# Shared by the daemons and the CLI when their own settings do not name the files.
ENV_CA, ENV_CERT, ENV_KEY = "VOLKIN_TLS_CA", "VOLKIN_TLS_CERT", "VOLKIN_TLS_KEY"
_RECHECK = 1.0  # seconds between looks at the files' modification times


@dataclass(frozen=True)
class Material:
    ca: bytes
    cert: bytes
    key: bytes


class Tls:
    """The TLS files of one process, re-read when they change."""

    def __init__(self, ca: str | Path, cert: str | Path, key: str | Path) -> None:
        self.paths = (Path(ca), Path(cert), Path(key))
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] = ()
        self._checked = 0.0
        self._material: Material | None = None
        self.generation = 0  # bumped each time the files are re-read after a change
        self._contexts: list[tuple[ssl.SSLContext, bool]] = []

    @property
    def ca_path(self) -> Path:
        return self.paths[0]

    def __repr__(self) -> str:
        return f"Tls(ca={self.paths[0]}, cert={self.paths[1]}, key={self.paths[2]})"

    # -- the files --------------------------------------------------------------------
    def check(self) -> None:
        """Raises InvalidArgument (one line) unless the files can be used now."""
        material = self.material()
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            context.load_verify_locations(cadata=material.ca.decode())
            context.load_cert_chain(self.paths[1], self.paths[2])
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise InvalidArgument(f"TLS files {self.paths[1]} and {self.paths[2]}: "
                                  f"{exc}") from None
        for path in (self.paths[0], self.paths[1]):
            not_after = expiry(path.read_bytes())
            if not_after is not None and not_after < datetime.datetime.now(datetime.UTC):
                raise InvalidArgument(f"TLS certificate {path} expired on "
                                      f"{not_after:%Y-%m-%d %H:%M:%S} UTC")

    def material(self) -> Material:
        """The files' contents, re-read if they changed since the last look."""
        with self._lock:
            now = time.monotonic()
            if self._material is not None and now - self._checked < _RECHECK:
                return self._material
            self._checked = now
            try:
                stamp = tuple(p.stat().st_mtime for p in self.paths)
            except OSError as exc:
                if self._material is not None:
                    return self._material  # being replaced: keep what worked
                raise InvalidArgument(f"TLS file {exc.filename}: {exc.strerror}") from None
            if stamp == self._stamp and self._material is not None:
                return self._material
            try:
                material = Material(*(p.read_bytes() for p in self.paths))
            except OSError as exc:
                if self._material is not None:
                    return self._material
                raise InvalidArgument(f"TLS file {exc.filename}: {exc.strerror}") from None
            changed = self._material is not None
            self._material, self._stamp = material, stamp
            if changed:
                self.generation += 1
                self._reload_contexts()
            return material

    # -- gRPC ---------------------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that demand a client certificate signed by the CA and
        pick up renewed files on the next handshake."""
        def configuration() -> grpc.ServerCertificateConfiguration:
            m = self.material()
            return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], m.ca)

        served = [self.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            self.material()
            if self.generation == served[0]:
                return None
            served[0] = self.generation
            return configuration()

        return grpc.dynamic_ssl_server_credentials(
            configuration(), fetch,  # type: ignore[arg-type]  # None means unchanged
            require_client_authentication=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        m = self.material()
        return grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key,
                                            certificate_chain=m.cert)

    # -- asyncio streams (NBD, block data ports) ----------------------------------------
    def server_context(self) -> ssl.SSLContext:
        """A context for servers: the peer must present a certificate the CA signed."""
        return self._context(server=True)

    def client_context(self) -> ssl.SSLContext:
        """A context for clients: the server's certificate must be the CA's and name
        the host dialled."""
        return self._context(server=False)

    def _context(self, server: bool) -> ssl.SSLContext:
        """One context of each kind per process, shared: renewed files are loaded into it."""
        with self._lock:
            for context, is_server in self._contexts:
                if is_server == server:
                    return context
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        self._load(context)
        with self._lock:
            self._contexts.append((context, server))
        return context

    def _load(self, context: ssl.SSLContext) -> None:
        m = self.material()
        context.load_verify_locations(cadata=m.ca.decode())
        context.load_cert_chain(self.paths[1], self.paths[2])

    def _reload_contexts(self) -> None:
        """Loads renewed files into every context handed out (called under the lock):
        connections made from now on use them."""
        m = self._material
        assert m is not None
        for context, _ in self._contexts:
            try:
                context.load_verify_locations(cadata=m.ca.decode())
                context.load_cert_chain(self.paths[1], self.paths[2])
            except (ssl.SSLError, OSError):
                pass  # a half-written pair: the next look loads it


def expiry(pem: bytes) -> datetime.datetime | None:
    """The not-after time of the first certificate in `pem` (None if it cannot be read)."""
    try:
        from cryptography import x509
        return x509.load_pem_x509_certificate(pem).not_valid_after_utc
    except (ImportError, ValueError):
        return None


def from_settings(ca: str, cert: str, key: str, what: str,
                  environ: Mapping[str, str] | None = None) -> Tls | None:
    """The process's TLS from its settings, else from VOLKIN_TLS_*; None for plaintext.
    All three files or none: anything else is an InvalidArgument naming `what`."""
    env = os.environ if environ is None else environ
    chosen = (ca or env.get(ENV_CA, ""), cert or env.get(ENV_CERT, ""),
              key or env.get(ENV_KEY, ""))
    if not any(chosen):
        return None
    if not all(chosen):
        names = ("tls_ca", "tls_cert", "tls_key")
        missing = [n for n, v in zip(names, chosen, strict=True) if not v]
        raise InvalidArgument(f"{what}: TLS needs a CA, a certificate and a key; "
                              f"missing {', '.join(missing)}")
    return Tls(*chosen)


def from_env(environ: Mapping[str, str] | None = None) -> Tls | None:
    """TLS from VOLKIN_TLS_CA, VOLKIN_TLS_CERT and VOLKIN_TLS_KEY, or None."""
    return from_settings("", "", "", "environment", environ)


def peer_name(auth_context: Mapping[str, Iterable[bytes]]) -> str:
    """The common name of a gRPC peer's certificate ('' without one)."""
    name = next(iter(auth_context.get("x509_common_name") or ()), b"")
    return name.decode(errors="replace")


def ssl_peer_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The common name of a TLS stream's peer certificate ('' without one)."""
    if ssl_object is None:
        return ""
    cert: dict[str, Any] = dict(ssl_object.getpeercert() or {})
    for rdn in cert.get("subject", ()):
        for pair in rdn:
            if pair[0] == "commonName":
                return str(pair[1])
    return ""


def server_host(address: str) -> str:
    """The host part of host:port, without IPv6 brackets (the name TLS verifies)."""
    return address.rpartition(":")[0].strip("[]")


# -- the process's TLS ---------------------------------------------------------------------
_configured: list[Tls | None] = []


def configure(tls: Tls | None) -> None:
    """Sets the TLS this process's channels and servers use (a daemon calls it once
    with its settings); until then `current()` reads the environment."""
    _configured[:] = [tls]


def current() -> Tls | None:
    if not _configured:
        _configured.append(from_env())
    return _configured[0]


class _Current:
    """The default of `tls=` below: the process's TLS (`current()`); None is plaintext."""


CURRENT = _Current()
Choice = Tls | None | _Current


def chosen(tls: Choice) -> Tls | None:
    return current() if isinstance(tls, _Current) else tls


def aio_channel(address: str, options: list[tuple[str, Any]] | None = None,
                tls: Choice = CURRENT) -> grpc.aio.Channel:
    """An asyncio gRPC channel to `address`: mTLS with `tls` (default: the process's;
    None: plaintext)."""
    tls = chosen(tls)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)


def channel(address: str, options: list[tuple[str, Any]] | None = None,
            tls: Choice = CURRENT) -> grpc.Channel:
    """A blocking gRPC channel to `address`, as `aio_channel`."""
    tls = chosen(tls)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


def add_port(server: grpc.Server | grpc.aio.Server, address: str,
             tls: Choice = CURRENT) -> int:
    """Binds `address` on `server`, with mTLS if the process has TLS; the bound port."""
    tls = chosen(tls)
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def scheme() -> str:
    """'https' or 'http', as the process's TLS says (for etcd's URLs)."""
    return "https" if current() is not None else "http"


def etcd_server_flags(tls: Tls | None) -> list[str]:
    """The flags that make etcd serve clients over mTLS with these files (its URLs must
    then be https)."""
    if tls is None:
        return []
    ca, cert, key = tls.paths
    return ["--cert-file", str(cert), "--key-file", str(key), "--trusted-ca-file", str(ca),
            "--client-cert-auth"]
