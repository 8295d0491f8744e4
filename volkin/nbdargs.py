"""How NBD clients name a volkin volume, with or without TLS.

    uri(address, export, tls_dir)    libnbd's nbdinfo, nbdcopy, nbdsh, fio's nbd engine
    qemu(address, export, tls_dir)   qemu-io, qemu-img (and qemu-storage-daemon's --blockdev
                                     takes `blockdev`'s options)

`tls_dir` is a directory with ca-cert.pem, client-cert.pem and client-key.pem
(`volkin.pki.nbd_client_dir`; `volkin dev up --tls` prints it as VOLKIN_NBD_TLS_DIR).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

ENV_TLS_DIR = "VOLKIN_NBD_TLS_DIR"
# The names qemu and libnbd (and the kernel's nbd-client, given as files) look for.
CA_FILE, CERT_FILE, KEY_FILE = "ca-cert.pem", "client-cert.pem", "client-key.pem"


def _split(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), port


def uri(address: str, export: str, tls_dir: str | Path | None = None) -> str:
    if not tls_dir:
        return f"nbd://{address}/{quote(export)}"
    return f"nbds://{address}/{quote(export)}?tls-certificates={quote(str(tls_dir))}"


def blockdev(address: str, export: str, tls_dir: str | Path | None = None,
             creds_id: str = "volkin-tls") -> str:
    """qemu's option string for the NBD block driver (`tls-creds` names the object that
    `tls_object` makes)."""
    host, port = _split(address)
    options = f"driver=nbd,server.type=inet,server.host={host},server.port={port},export={export}"
    return options + (f",tls-creds={creds_id}" if tls_dir else "")


def linked_dir(ca: Path, cert: Path, key: Path, directory: Path) -> Path:
    """A certificate directory for the NBD clients made of links to a process's TLS files
    (so renewed files are what the next connection reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, target in ((CA_FILE, ca), (CERT_FILE, cert), (KEY_FILE, key)):
        link = directory / name
        link.unlink(missing_ok=True)
        link.symlink_to(target.resolve())
    return directory


def tls_object(tls_dir: str | Path, creds_id: str = "volkin-tls") -> str:
    return f"tls-creds-x509,id={creds_id},dir={tls_dir},endpoint=client"


def qemu(address: str, export: str, tls_dir: str | Path | None = None) -> list[str]:
    """The arguments that make qemu-io or qemu-img open the volume (raw, over NBD)."""
    if not tls_dir:
        return ["-f", "raw", uri(address, export)]
    return ["--object", tls_object(tls_dir), "--image-opts", blockdev(address, export, tls_dir)]
