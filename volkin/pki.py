"""A throwaway certificate authority for `volkin dev up --tls` and the tests.

`make_ca(directory)` writes `ca.pem` and `ca-key.pem`; `issue(...)` writes
`<name>.pem` and `<name>-key.pem`, a certificate usable both as server and as
client (every volkin process is both) for the names and addresses given. For
qemu and libnbd, which want a directory of fixed names, `nbd_client_dir` lays one
out (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).

Production clusters bring their own CA; nothing here is needed then.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from volkin import nbdargs

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


def make_ca(directory: Path, name: str = "volkin dev CA", days: int = 365) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + days * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    issued = Issued(directory / "ca.pem", directory / "ca-key.pem")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(issued.key, key)
    return issued


def local_names() -> list[str]:
    """The names this machine is dialled by in a dev cluster."""
    names = ["localhost", "127.0.0.1", "::1"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names:
            names.append(name)
    return names


def issue(ca: Issued, directory: Path, name: str, hosts: list[str] | None = None,
          days: int = 365, expired: bool = False) -> Issued:
    """A certificate with common name `name` for `hosts` (DNS names or IP addresses;
    default: this machine's), signed by `ca`; `expired` makes one that ended yesterday."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts if hosts is not None else local_names():
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    start, end = (now - 3 * _DAY, now - _DAY) if expired else (now - _DAY, now + days * _DAY)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    issued = Issued(directory / f"{name}.pem", directory / f"{name}-key.pem")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(issued.key, key)
    return issued


def nbd_client_dir(ca: Path, issued: Issued, directory: Path) -> Path:
    """The directory qemu (`tls-creds-x509,dir=`) and libnbd (`tls-certificates=`) read."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca, directory / nbdargs.CA_FILE)
    shutil.copyfile(issued.cert, directory / nbdargs.CERT_FILE)
    shutil.copyfile(issued.key, directory / nbdargs.KEY_FILE)
    os.chmod(directory / nbdargs.KEY_FILE, 0o600)
    return directory
