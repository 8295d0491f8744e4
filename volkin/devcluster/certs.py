"""The dev cluster's throwaway CA and certificates (`volkin dev up --tls`), in DIR/tls.

    ca.pem, ca-key.pem          the CA (never leaves DIR)
    node.pem, node-key.pem      etcd, the agents and the controller (CN node)
    admin.pem, admin-key.pem    the user: `dev up` prints VOLKIN_TLS_* naming these
    reader.pem, reader-key.pem  a read-only identity (the controller's tls_readers)
    nbd-client/                 admin's, laid out for qemu's tls-creds-x509 and libnbd

All are made once, valid for a year, for this machine's names (localhost,
127.0.0.1, its host name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from volkin import nbdargs, pki
from volkin.tls import Tls

ADMIN, READER, NODE = "admin", "reader", "node"


@dataclass(frozen=True)
class DevCerts:
    directory: Path

    def _issued(self, name: str) -> pki.Issued:
        return pki.Issued(self.directory / f"{name}.pem", self.directory / f"{name}-key.pem")

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def nbd_client_dir(self) -> Path:
        return self.directory / "nbd-client"

    def tls(self, name: str = ADMIN) -> Tls:
        issued = self._issued(name)
        return Tls(self.ca, issued.cert, issued.key)

    def flags(self, name: str = NODE) -> list[str]:
        """A daemon's --tls-* flags."""
        issued = self._issued(name)
        return ["--tls-ca", str(self.ca), "--tls-cert", str(issued.cert),
                "--tls-key", str(issued.key)]

    def environment(self) -> dict[str, str]:
        """What the user exports: the CLI's TLS (admin) and the NBD clients' directory."""
        issued = self._issued(ADMIN)
        return {"VOLKIN_TLS_CA": str(self.ca), "VOLKIN_TLS_CERT": str(issued.cert),
                "VOLKIN_TLS_KEY": str(issued.key), "VOLKIN_NBD_TLS_DIR": str(self.nbd_client_dir)}


def ensure(cluster_dir: Path) -> DevCerts:
    """The certificates of the dev cluster in `cluster_dir`, made if missing."""
    certs = DevCerts(cluster_dir / "tls")
    if not (certs.nbd_client_dir / nbdargs.KEY_FILE).exists():
        ca = pki.make_ca(certs.directory)
        for name in (NODE, ADMIN, READER):
            pki.issue(ca, certs.directory, name)
        pki.nbd_client_dir(ca.cert, certs._issued(ADMIN), certs.nbd_client_dir)
    return certs


def of(cluster_dir: Path, tls: bool) -> DevCerts | None:
    return DevCerts(cluster_dir / "tls") if tls else None
