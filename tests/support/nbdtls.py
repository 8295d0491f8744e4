"""Certificates for NBD over TLS: a server's files, and client directories of each kind.

A client directory is what qemu (`--object tls-creds-x509,dir=DIR,endpoint=client`)
and libnbd (`tls-certificates=DIR`) read: `ca-cert.pem` (the server's CA, so every
client here trusts the server) and, but for `anonymous`, `client-cert.pem` and
`client-key.pem`. Only the client certificate differs, so a refusal is the
server's. (qemu checks its own certificate before it connects: it refuses an
expired one itself, and one its `ca-cert.pem` cannot verify, which is why the
foreign directory's `ca-cert.pem` holds the other CA too.)

    certs = make(tmp_path)
    NbdServer(device, tls=certs.server)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from volkin import pki
from volkin.tls import Tls

# The names the servers in tests are dialled by.
HOSTS = ["localhost", "127.0.0.1"]


@dataclass(frozen=True)
class Certificates:
    server: Tls  # the NBD server's CA, certificate and key
    good: Path  # a client certificate the CA signed (common name "good-client")
    foreign: Path  # a client certificate another CA signed
    expired: Path  # a client certificate the CA signed, expired yesterday
    anonymous: Path  # no client certificate at all


def make(directory: Path) -> Certificates:
    ca = pki.make_ca(directory / "ca")
    other_ca = pki.make_ca(directory / "other-ca", name="another CA")
    server = pki.issue(ca, directory / "server", "nbd-server", hosts=HOSTS)
    issued = directory / "issued"
    good = pki.issue(ca, issued, "good-client", hosts=HOSTS)
    foreign = pki.issue(other_ca, issued, "foreign-client", hosts=HOSTS)
    expired = pki.issue(ca, issued, "expired-client", hosts=HOSTS, expired=True)
    foreign_dir = pki.nbd_client_dir(ca.cert, foreign, directory / "foreign")
    (foreign_dir / "ca-cert.pem").write_bytes(ca.cert.read_bytes()
                                              + other_ca.cert.read_bytes())
    anonymous = directory / "anonymous"
    anonymous.mkdir()
    shutil.copyfile(ca.cert, anonymous / "ca-cert.pem")
    return Certificates(
        server=Tls(ca.cert, server.cert, server.key),
        good=pki.nbd_client_dir(ca.cert, good, directory / "good"),
        foreign=foreign_dir,
        expired=pki.nbd_client_dir(ca.cert, expired, directory / "expired"),
        anonymous=anonymous)
