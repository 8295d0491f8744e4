"""`volkin dev up/status/down`: a whole cluster on loopback, idempotent, and nothing left over."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.cli.conftest import DevCluster, one_error_line, volkin
from tests.support import tls
from volkin import tls as vtls
from volkin.devcluster import processes

pytestmark = pytest.mark.integration


def _serving(address: str, env: dict[str, str]) -> bool:
    """gRPC health says SERVING (over mTLS with the dev cluster's admin identity if
    `env`, what `dev up` printed, has one)."""
    with vtls.channel(address, tls=vtls.from_env(env)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _alive(pid: object, argv: object) -> bool:
    assert isinstance(pid, int) and isinstance(argv, list)
    return processes.is_running(pid, argv)


@pytest.mark.slow
def test_up_is_idempotent_restarts_only_what_died_and_down_leaves_nothing(
        dev_dir: DevCluster) -> None:
    first = dev_dir.up("--agents", "2")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    tls_names = ["VOLKIN_TLS_CA", "VOLKIN_TLS_CERT", "VOLKIN_TLS_KEY", "VOLKIN_NBD_TLS_DIR"]
    assert [line.split("=")[0] for line in lines] == \
        ["VOLKIN_CONTROLLER", "VOLKIN_NBD", *(tls_names if tls.enabled() else [])]
    controller, nbd = dev_dir.env["VOLKIN_CONTROLLER"], dev_dir.env["VOLKIN_NBD"]
    assert controller.startswith("127.0.0.1:") and nbd.startswith("127.0.0.1:")
    assert _serving(controller, dev_dir.env)

    status = dev_dir.status()
    assert list(status) == ["etcd", "agent1", "agent2", "controller"]
    assert all(c["running"] and isinstance(c["pid"], int) for c in status.values())
    assert status["controller"]["address"] == controller
    assert status["controller"]["extra"] == {"nbd": nbd}
    assert len({c["pid"] for c in status.values()}) == 4
    for name in ("agent1", "agent2"):
        assert _serving(str(status[name]["address"]), dev_dir.env)
    assert all(Path(str(c["log"])).is_file() for c in status.values())

    again = dev_dir.up("--verbose")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert "starting" not in again.stderr
    assert dev_dir.status() == status, "nothing was restarted"

    victim = dict(dev_dir.recorded_pids())[int(str(status["agent2"]["pid"]))]
    os.kill(int(str(status["agent2"]["pid"])), signal.SIGKILL)
    assert processes.wait_gone(int(str(status["agent2"]["pid"])), victim, 5)
    healed = dev_dir.up("--verbose")
    assert healed.returncode == 0, healed.stderr
    assert healed.stdout == first.stdout
    assert healed.stderr.count("starting") == 1 and "starting agent2" in healed.stderr
    after = dev_dir.status()
    assert after["agent2"]["pid"] != status["agent2"]["pid"]
    assert after["agent2"]["address"] == status["agent2"]["address"], "same port again"
    assert all(after[n] == status[n] for n in ("etcd", "agent1", "controller"))
    assert _serving(str(after["agent2"]["address"]), dev_dir.env)

    pids = dev_dir.recorded_pids()
    down = volkin("dev", "down", "--dir", str(dev_dir.dir))
    assert down.returncode == 0, down.stderr
    assert not any(processes.is_running(pid, argv) for pid, argv in pids)
    stopped = dev_dir.status()
    assert all(not c["running"] and c["pid"] is None for c in stopped.values())
    assert stopped["controller"]["address"] == controller, "addresses are kept for next up"


@pytest.mark.slow
def test_a_component_that_cannot_start_is_named_with_its_log(dev_dir: DevCluster) -> None:
    assert dev_dir.up("--agents", "1").returncode == 0
    dev_dir.ok("volume", "create", "kept", "--size", "1MiB")
    port = int(dev_dir.env["VOLKIN_CONTROLLER"].rpartition(":")[2])
    assert volkin("dev", "down", "--dir", str(dev_dir.dir)).returncode == 0
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        error = one_error_line(dev_dir.up())
        assert "controller exited during start-up" in error
        assert str(dev_dir.dir / "logs" / "controller.log") in error
        assert "volkin dev up --new-ports" in error
        status = dev_dir.status()
        assert status["etcd"]["running"] and status["agent1"]["running"]
        assert not status["controller"]["running"]
        # The port stays taken: the controller moves, the rest and the data stay.
        assert dev_dir.up("--new-ports").returncode == 0
        moved = dev_dir.status()
        assert moved["controller"]["running"] and moved["controller"]["address"] != \
            status["controller"]["address"]
        assert moved["agent1"]["address"] == status["agent1"]["address"]
        assert "kept" in dev_dir.ok("volume", "list")
    assert volkin("dev", "down", "--dir", str(dev_dir.dir)).returncode == 0
    assert dev_dir.up().returncode == 0, "up again on the new ports"
    assert dev_dir.status()["controller"]["running"]


def test_etcd_missing_from_path_is_a_clear_error(dev_dir: DevCluster, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    done = volkin("dev", "up", "--dir", str(dev_dir.dir), env={"PATH": str(empty)})
    assert done.returncode == 1
    assert "etcd is not on PATH" in one_error_line(done) and "etcd-server" in done.stderr


def test_a_directory_that_cannot_be_used_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = volkin("dev", "up", "--dir", str(blocker / "dev"))
    assert done.returncode == 2
    assert f"cannot use {blocker / 'dev'}" in one_error_line(done)
    assert "Not a directory" in done.stderr


def test_an_unreadable_cluster_file_is_a_directory_that_cannot_be_used(tmp_path: Path) -> None:
    (tmp_path / "cluster.json").write_text("{not json")
    for command in ("up", "status", "down"):
        done = volkin("dev", command, "--dir", str(tmp_path))
        assert done.returncode == 2, command
        assert f"cannot read {tmp_path / 'cluster.json'}" in one_error_line(done)
        assert "remove it to start afresh" in done.stderr


def test_status_and_down_of_a_directory_without_a_cluster_say_so(tmp_path: Path) -> None:
    for command in ("status", "down"):
        done = volkin("dev", command, "--dir", str(tmp_path))
        assert done.returncode == 1
        assert f"no dev cluster in {tmp_path}" in one_error_line(done)


def test_the_dev_cluster_needs_only_what_the_checkout_has() -> None:
    assert shutil.which("etcd"), "CI installs etcd-server"
    assert sys.executable
