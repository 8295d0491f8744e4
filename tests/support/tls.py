"""TLS for the tests: the whole suite runs with it unless VOLKIN_TEST_TLS=0.

tests/conftest.py makes one CA for the session and exports VOLKIN_TLS_CA, _CERT and
_KEY (a certificate named `node`, for this machine's names) and VOLKIN_NBD_TLS_DIR:
every daemon the tests start, every in-process client (`volkin.tls.current()`),
etcd (tests/support/etcd.py) and every NBD client (`volkin.nbdargs`) then use it.
`Pki` makes further identities (another CA, an expired or read-only certificate)
for the tests of refusals.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import volkin.tls
from volkin import nbdargs, pki
from volkin.nbdargs import ENV_TLS_DIR

ENV_SWITCH = "VOLKIN_TEST_TLS"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


@dataclass
class Pki:
    directory: Path
    ca: pki.Issued

    @classmethod
    def make(cls, directory: Path, name: str = "test CA") -> Pki:
        return cls(directory, pki.make_ca(directory, name))

    def issue(self, name: str, expired: bool = False) -> pki.Issued:
        return pki.issue(self.ca, self.directory, name, expired=expired)

    def tls(self, name: str, expired: bool = False) -> volkin.tls.Tls:
        issued = self.issue(name, expired)
        return volkin.tls.Tls(self.ca.cert, issued.cert, issued.key)

    def nbd_dir(self, name: str) -> Path:
        return pki.nbd_client_dir(self.ca.cert, self.issue(name),
                                  self.directory / f"{name}-nbd")

    def environment(self, name: str = "node") -> dict[str, str]:
        """VOLKIN_TLS_* for a process with identity `name`, and its NBD client directory."""
        issued = self.issue(name)
        return {volkin.tls.ENV_CA: str(self.ca.cert), volkin.tls.ENV_CERT: str(issued.cert),
                volkin.tls.ENV_KEY: str(issued.key), ENV_TLS_DIR: str(self.nbd_dir(name))}


def nbd_tls_dir() -> str | None:
    """The NBD clients' certificate directory while the suite runs with TLS."""
    return os.environ.get(ENV_TLS_DIR) or None


def nbd_uri(address: str, export: str) -> str:
    """The libnbd URI of a volume of a controller the tests started (TLS as the suite)."""
    return nbdargs.uri(address, export, nbd_tls_dir())


def qemu_nbd(address: str, export: str) -> list[str]:
    """qemu-io's or qemu-img's arguments for a volume of a controller the tests started."""
    return nbdargs.qemu(address, export, nbd_tls_dir())


def libnbd_tls(handle: Any, nbd: Any) -> None:
    """Makes a libnbd handle require TLS with the suite's client certificate (if the suite
    runs with TLS); call before connecting."""
    directory = nbd_tls_dir()
    if directory:
        handle.set_tls(nbd.TLS_REQUIRE)
        handle.set_tls_certificates(directory)


def fio_nbd(address: str, export: str) -> tuple[list[str], str]:
    """How to run fio's nbd engine on a volume: the command's prefix and the URI.

    With TLS, fio cannot be handed the client certificate: libnbd reads a
    `tls-certificates=` URI parameter only if the program allows local files (fio does
    not), else it reads $HOME/.pki/libnbd, except as root, where it reads
    /etc/pki/libnbd. So fio runs as `nobody` with a HOME of its own holding a copy of the
    suite's client certificate (this machine's /etc stays untouched)."""
    directory = nbd_tls_dir()
    if not directory:
        return [], nbdargs.uri(address, export)
    # Beside the suite's directory, which only root may enter (tests/conftest.py removes it).
    pki_dir = Path(directory).parent
    home = pki_dir.with_name(pki_dir.name + "-fio-home")
    certificates = home / ".pki" / "libnbd"
    if not (certificates / nbdargs.KEY_FILE).exists():
        certificates.mkdir(parents=True, exist_ok=True)
        for name in (nbdargs.CA_FILE, nbdargs.CERT_FILE, nbdargs.KEY_FILE):
            shutil.copyfile(Path(directory) / name, certificates / name)
        for path in (home, home / ".pki", certificates, *certificates.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
              "env", f"HOME={home}"]
    return prefix, f"nbds://{address}/{export}"


def cli_environment() -> dict[str, str]:
    """The suite's VOLKIN_TLS_* for a `volkin` command (empty without TLS)."""
    return {k: v for k, v in os.environ.items() if k.startswith("VOLKIN_TLS_")}
