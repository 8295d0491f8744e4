"""Every port of a TLS cluster refuses strangers: plaintext clients, certificates of
another CA, expired certificates; read-only identities cannot change anything; renewed
files are used without a restart.

The cluster here has its own CA whatever VOLKIN_TEST_TLS says: real etcd, agent and
controller processes started with it in their environment (VOLKIN_TLS_*).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import volkin.tls
from tests.agent.conftest import REPO, Agent
from tests.controller.conftest import Controller
from tests.support.etcd import EtcdServer
from tests.support.tls import Pki
from volkin import blockwire, etcd
from volkin.api.v1 import admin_pb2
from volkin.blockclient import DataConnection
from volkin.errors import VolkinError
from volkin.tls import Tls

pytestmark = pytest.mark.integration


class TlsCluster:
    def __init__(self, pki: Pki, etcd: EtcdServer, agent: Agent, controller: Controller) -> None:
        self.pki, self.etcd, self.agent, self.controller = pki, etcd, agent, controller

    def stranger(self) -> Tls:
        """Trusts this cluster's CA but holds a certificate of another CA."""
        other = Pki.make(self.pki.directory / "other", "another CA").issue("node")
        return Tls(self.pki.ca.cert, other.cert, other.key)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    root = tmp_path_factory.mktemp("tls")
    pki = Pki.make(root / "pki")
    saved = {k: os.environ.get(k) for k in pki.environment()}
    os.environ.update(pki.environment("node"))
    volkin.tls.configure(volkin.tls.from_env())
    server = EtcdServer(root / "etcd")
    agent = controller = None
    try:
        server.start()
        agent = Agent("a1", root / "a1", server)
        agent.start()
        controller = Controller("c1", root, server, ("--tls-admins", "node,admin")).start()
        yield TlsCluster(pki, server, agent, controller)
    finally:
        for done in (controller, agent):
            if done is not None:
                done.stop()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        volkin.tls.configure(volkin.tls.from_env())


def _health(address: str, tls: Tls | None) -> str:
    """SERVING, or the status code of the failure."""
    with volkin.tls.channel(address, tls=tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _data_port(address: str, tls: Tls | None) -> str:
    """'ok' if the agent's data port answers a look-up, else the error."""
    async def ask() -> str:
        connection = DataConnection(address, tls.client_context() if tls else None)
        try:
            await connection.call(blockwire.Op.MAP, "no-such-extent", 0, 4096, timeout=5)
            return "ok"
        except VolkinError as exc:
            return f"{type(exc).__name__}: {exc.message}"
        finally:
            await connection.close()
    return asyncio.run(ask())


def _etcd(endpoint: str, tls: Tls | None) -> str:
    """'ok' if etcd answers a get over `tls` (None: plaintext), else the error."""
    async def ask() -> str:
        client = await etcd.connect([endpoint], timeout=5, tls=tls)
        try:
            await client.get("/volkin/controller/epoch")
            return "ok"
        except etcd.EtcdUnavailable as exc:
            return f"EtcdUnavailable: {exc.message}"
        finally:
            await client.close()
    return asyncio.run(ask())


def test_the_cluster_works_over_tls_with_the_cluster_certificates(cluster: TlsCluster) -> None:
    node = volkin.tls.current()
    assert node is not None
    assert _health(cluster.controller.admin, node) == "SERVING"
    assert _health(cluster.agent.address, node) == "SERVING"
    assert _data_port(cluster.agent.data_address, node).startswith(("ok", "NotFound"))
    assert _etcd(cluster.etcd.endpoint, node) == "ok"
    stub = cluster.controller.stub
    stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="over-tls", size_bytes=4 << 20))
    assert "over-tls" in {v.name for v in stub.ListVolumes(admin_pb2.ListVolumesRequest()).volumes}
    assert "tls=on" in cluster.controller.log() and "tls=on" in cluster.agent.log()


def test_every_port_refuses_a_plaintext_client(cluster: TlsCluster) -> None:
    assert _health(cluster.controller.admin, None) == "UNAVAILABLE"
    assert _health(cluster.agent.address, None) == "UNAVAILABLE"
    assert _data_port(cluster.agent.data_address, None).startswith("Unavailable")
    assert _etcd(cluster.etcd.endpoint, None).startswith("EtcdUnavailable")


def test_every_port_refuses_a_certificate_of_another_ca(cluster: TlsCluster) -> None:
    stranger = cluster.stranger()
    assert _health(cluster.controller.admin, stranger) == "UNAVAILABLE"
    assert _health(cluster.agent.address, stranger) == "UNAVAILABLE"
    assert _data_port(cluster.agent.data_address, stranger).startswith("Unavailable")
    assert _etcd(cluster.etcd.endpoint, stranger).startswith("EtcdUnavailable")


def test_every_port_refuses_an_expired_certificate(cluster: TlsCluster) -> None:
    expired = cluster.pki.tls("old-node", expired=True)
    assert _health(cluster.controller.admin, expired) == "UNAVAILABLE"
    assert _health(cluster.agent.address, expired) == "UNAVAILABLE"
    assert _data_port(cluster.agent.data_address, expired).startswith("Unavailable")
    assert _etcd(cluster.etcd.endpoint, expired).startswith("EtcdUnavailable")


def _cli(cluster: TlsCluster, name: str | None, *args: str, expired: bool = False,
         stranger: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLKIN_")}
    env.update(PYTHONPATH=str(REPO), VOLKIN_CONTROLLER=cluster.controller.admin)
    if name is not None:
        tls = cluster.stranger() if stranger else cluster.pki.tls(name, expired)
        ca, cert, key = tls.paths
        env.update(VOLKIN_TLS_CA=str(ca), VOLKIN_TLS_CERT=str(cert), VOLKIN_TLS_KEY=str(key))
    return subprocess.run([sys.executable, "-m", "volkin.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO)


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("volkin: "), done.stderr
    return done.stderr


def test_the_cli_explains_each_refusal_in_one_line(cluster: TlsCluster) -> None:
    assert "may require TLS" in _one_line(_cli(cluster, None, "volume", "list"))
    assert "refused the TLS handshake" in _one_line(
        _cli(cluster, "x", "volume", "list", stranger=True))
    expired = _cli(cluster, "old-admin", "volume", "list", expired=True)
    assert expired.returncode == 2 and "expired on" in _one_line(expired)
    assert _cli(cluster, "admin", "volume", "list").returncode == 0


def test_a_daemon_with_an_expired_certificate_does_not_start_and_says_why(
        cluster: TlsCluster, tmp_path: Path) -> None:
    old = cluster.pki.issue("old-agent", expired=True)
    done = subprocess.run(
        [sys.executable, "-m", "agent", "--data-dir", str(tmp_path / "d"), "--tls-ca",
         str(cluster.pki.ca.cert), "--tls-cert", str(old.cert), "--tls-key", str(old.key)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "expired on" in done.stderr, done.stderr


def test_a_read_only_identity_reads_but_changes_nothing_and_the_refusal_is_audited(
        cluster: TlsCluster) -> None:
    listing = _cli(cluster, "reader", "volume", "list")
    assert listing.returncode == 0, listing.stderr
    refused = _cli(cluster, "reader", "volume", "create", "by-reader", "--size", "4MiB")
    assert "may only read" in _one_line(refused) and "PERMISSION_DENIED" in refused.stderr
    names = {v.name for v in cluster.controller.stub.ListVolumes(
        admin_pb2.ListVolumesRequest()).volumes}
    assert "by-reader" not in names
    assert "event=audit.create_volume who=reader" in cluster.controller.log()
    made = _cli(cluster, "admin", "volume", "create", "by-admin", "--size", "4MiB")
    assert made.returncode == 0, made.stderr
    assert "event=audit.create_volume who=admin volume=by-admin" in cluster.controller.log()


def test_renewed_files_are_used_without_a_restart(cluster: TlsCluster, tmp_path: Path) -> None:
    """The agent's files are replaced by a new CA's: new connections use them at once."""
    new = Pki.make(tmp_path / "new", "renewed CA")
    renewed = new.issue("node")
    node = volkin.tls.current()
    assert node is not None
    old_ca, old_cert, old_key = node.paths
    backup = tmp_path / "backup"
    backup.mkdir()
    for path in (old_ca, old_cert, old_key):
        shutil.copy2(path, backup / path.name)
    try:
        for source, target in ((new.ca.cert, old_ca), (renewed.cert, old_cert),
                               (renewed.key, old_key)):
            shutil.copyfile(source, target)
        time.sleep(1.2)  # files are looked at again at most once a second
        fresh = Tls(new.ca.cert, renewed.cert, renewed.key)
        # The agent and the controller read the same (shared) files: both renewed.
        assert _health(cluster.agent.address, fresh) == "SERVING"
        assert _data_port(cluster.agent.data_address, fresh).startswith(("ok", "NotFound"))
        assert _health(cluster.controller.admin, fresh) == "SERVING"
        old = Tls(backup / old_ca.name, backup / old_cert.name, backup / old_key.name)
        assert _health(cluster.agent.address, old) == "UNAVAILABLE"
    finally:
        for path in (old_ca, old_cert, old_key):
            shutil.copyfile(backup / path.name, path)
        time.sleep(1.2)
    assert _health(cluster.agent.address, node) == "SERVING"
