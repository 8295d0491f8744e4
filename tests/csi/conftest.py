"""CSI tests run the real driver (`python3 -m volkin.csi`) as a process on a unix socket in
a temporary directory, against a dev cluster of real etcd, agent and controller processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.cli.conftest import REPO, DevCluster
from volkin.api.csi.v1 import csi_pb2, csi_pb2_grpc

Mode = csi_pb2.VolumeCapability.AccessMode


class Driver:
    """One `volkin-csi` process; `controller`, `node` and `identity` are its stubs."""

    def __init__(self, directory: Path, cluster: DevCluster, mode: str = "all",
                 extra: tuple[str, ...] = ()) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "csi.sock"
        self.state_dir = self.dir / "state"
        self.log_path = self.dir / "driver.log"
        self.cluster = cluster
        self.argv = [sys.executable, "-m", "volkin.csi", "--endpoint", f"unix://{self.socket}",
                     "--node-id", "node1", "--controller", cluster.env["VOLKIN_CONTROLLER"],
                     "--nbd", cluster.env["VOLKIN_NBD"], "--mode", mode,
                     "--state-dir", str(self.state_dir), "--delete-wait", "10", *extra]
        self.process: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    def start(self) -> Driver:
        served = self.log().count("event=csi.serving")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env=self.environment())
        deadline = time.monotonic() + 30
        while self.log().count("event=csi.serving") == served:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"volkin-csi did not start:\n{self.log()}")
            time.sleep(0.05)
        self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def environment(self) -> dict[str, str]:
        """The driver's environment: the dev cluster's TLS identity (admin), if it has one."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOLKIN_TLS_")}
        env.update({k: v for k, v in self.cluster.env.items() if k.startswith("VOLKIN_TLS_")})
        return {**env, "PYTHONPATH": str(REPO)}

    @property
    def channel(self) -> grpc.Channel:
        assert self._channel is not None
        return self._channel

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        return csi_pb2_grpc.IdentityStub(self.channel)  # type: ignore[no-untyped-call]

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)  # type: ignore[no-untyped-call]

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)  # type: ignore[no-untyped-call]

    def unstage_everything(self) -> None:
        """What a failed test left published or staged: unmounted and detached (detaching
        through the driver, which knows how), so no loop device or daemon outlives it."""
        if self._channel is None:
            return
        test_dir = str(self.dir.parent)
        with open("/proc/self/mountinfo") as f:
            mounted = [line.split()[4] for line in f]
        for path in sorted((m for m in mounted if m.startswith(test_dir + "/")
                            and not m.startswith(str(self.state_dir))), key=len, reverse=True):
            subprocess.run(["umount", path], check=False)
        for record in (self.state_dir / "volumes").glob("*.json"):
            staged = json.loads(record.read_text())
            with contextlib.suppress(grpc.RpcError):
                self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=staged["volume"], staging_target_path=staged["staging_path"]))

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def mount_capability(fs_type: str = "", mode: int = Mode.SINGLE_NODE_WRITER
                     ) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=Mode(mode=mode))  # type: ignore[arg-type]


def block_capability(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=Mode(mode=mode))  # type: ignore[arg-type]


def can_attach_here() -> str:
    """Why this machine cannot attach through FUSE and a loop device, or ""."""
    if os.geteuid() != 0:
        return "needs root (mount, losetup)"
    for tool in ("qemu-storage-daemon", "losetup", "mkfs.ext4", "mkfs.xfs", "blkid"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/install installs it)"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "no /dev/fuse or /dev/loop-control"
    return ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """A dev cluster with 2 agents, shared by one test module."""
    dev = DevCluster(tmp_path_factory.mktemp("csi-cluster") / "dev")
    try:
        done = dev.up("--agents", "2")
        assert done.returncode == 0, done.stderr
        yield dev
    finally:
        dev.teardown()


@pytest.fixture
def driver(tmp_path: Path, cluster: DevCluster) -> Iterator[Driver]:
    """`volkin-csi --mode all` on a socket in this test's directory."""
    started = Driver(tmp_path / "csi", cluster).start()
    try:
        yield started
    finally:
        started.unstage_everything()
        started.stop()
