"""The node service on this machine (no kernel NBD: qemu-storage-daemon's FUSE export and a
loop device): a file system written through one volume is read back through a clone of
its snapshot, what NodeStage attached is detached even after the driver restarted, and a
staged volume keeps working across a restart of the controller."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import grpc
import pytest

from tests.csi.conftest import Driver, block_capability, can_attach_here, mount_capability
from volkin.api.csi.v1 import csi_pb2

pytestmark = [pytest.mark.integration]

MiB = 1 << 20
Usage = csi_pb2.VolumeUsage


@pytest.fixture(autouse=True)
def _needs_fuse_and_loop() -> None:
    reason = can_attach_here()
    if reason:
        pytest.skip(reason)


class Node:
    """Stage and publish through the driver, as the kubelet does, remembering what to undo."""

    def __init__(self, driver: Driver, root: Path) -> None:
        self.driver = driver
        self.root = root
        self.published: list[tuple[str, str]] = []
        self.staged: list[tuple[str, str]] = []

    def attach(self, volume_id: str, cap: csi_pb2.VolumeCapability,
               readonly: bool = False) -> str:
        staging = self.root / "staging" / volume_id
        target = self.root / "pods" / volume_id / "volume"
        staging.mkdir(parents=True, exist_ok=True)
        self.driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap))
        self.staged.append((volume_id, str(staging)))
        self.driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=cap, readonly=readonly))
        self.published.append((volume_id, str(target)))
        return str(target)

    def detach_all(self) -> None:
        for volume_id, target in reversed(self.published):
            self.driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=volume_id, target_path=target))
        for volume_id, staging in reversed(self.staged):
            self.driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=volume_id, staging_target_path=staging))
        self.published.clear()
        self.staged.clear()


def create(driver: Driver, name: str, size: int, cap: csi_pb2.VolumeCapability,
           source: csi_pb2.VolumeContentSource | None = None) -> csi_pb2.Volume:
    created: csi_pb2.CreateVolumeResponse = driver.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[cap], volume_content_source=source))
    return created.volume


def write_tree(root: Path) -> dict[str, str]:
    """A few files and a directory; returns each file's sha256."""
    (root / "dir").mkdir()
    files = {"small.txt": b"volkin\n", "dir/random.bin": os.urandom(3 * MiB + 123),
             "dir/zeros.bin": bytes(2 * MiB)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    os.sync()
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def read_tree(root: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in names}


def leftovers(driver: Driver) -> list[str]:
    """Loop devices, FUSE exports and records this driver left behind."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if str(driver.state_dir) in backing.read_text():
            found.append(str(backing))
    with open("/proc/self/mountinfo") as f:
        found += [line.split()[4] for line in f if str(driver.state_dir) in line]
    found += [str(p) for p in (driver.state_dir / "volumes").glob("*.json")]
    return found


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_files_written_on_a_volume_read_back_from_a_clone_of_its_snapshot(
        driver: Driver, tmp_path: Path, fs_type: str) -> None:
    node = Node(driver, tmp_path / "kubelet")
    cap = mount_capability(fs_type)
    size = 512 * MiB  # thin: only what the file system writes takes space
    try:
        origin = create(driver, f"origin-{fs_type}", size, cap)
        mounted = Path(node.attach(origin.volume_id, cap))
        written = write_tree(mounted)

        snapshot = driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            source_volume_id=origin.volume_id, name=f"snap-{fs_type}")).snapshot
        assert snapshot.ready_to_use and snapshot.source_volume_id == origin.volume_id
        # Written after the snapshot: the clone must not see it.
        (mounted / "small.txt").write_text("changed after the snapshot\n")
        (mounted / "later.txt").write_text("later\n")
        os.sync()

        clone = create(driver, f"clone-{fs_type}", size, cap, csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                snapshot_id=snapshot.snapshot_id)))
        assert clone.content_source.snapshot.snapshot_id == snapshot.snapshot_id
        cloned = Path(node.attach(clone.volume_id, cap))

        assert read_tree(cloned, list(written)) == written
        assert not (cloned / "later.txt").exists()
        assert (mounted / "small.txt").read_text() == "changed after the snapshot\n"

        stats = driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=clone.volume_id, volume_path=str(cloned)))
        units = {u.unit: u for u in stats.usage}
        assert units[Usage.BYTES].used >= 5 * MiB
        assert 0 < units[Usage.BYTES].total <= size
        assert units[Usage.INODES].used > 0
    finally:
        node.detach_all()
    assert leftovers(driver) == []
    for volume_id in (f"clone-{fs_type}", f"origin-{fs_type}"):
        driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=f"snap-{fs_type}"))


def test_a_block_volume_cloned_from_a_volume_reads_its_bytes_and_a_readonly_publish_refuses_writes(
        driver: Driver, tmp_path: Path) -> None:
    node = Node(driver, tmp_path / "kubelet")
    cap = block_capability()
    data = os.urandom(MiB)
    try:
        origin = create(driver, "block-origin", 16 * MiB, cap)
        device = node.attach(origin.volume_id, cap)
        with open(device, "r+b") as f:
            f.seek(4 * MiB)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        stats = driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=origin.volume_id, volume_path=device))
        assert [(u.unit, u.total) for u in stats.usage] == [(Usage.BYTES, 16 * MiB)]

        clone = create(driver, "block-clone", 16 * MiB, cap, csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=origin.volume_id)))
        cloned = node.attach(clone.volume_id, cap, readonly=True)
        with open(cloned, "rb") as f:
            f.seek(4 * MiB)
            assert f.read(MiB) == data
        fd = os.open(cloned, os.O_RDWR)
        try:
            with pytest.raises(OSError):
                os.write(fd, bytes(4096))
        finally:
            os.close(fd)
    finally:
        node.detach_all()
    assert leftovers(driver) == []
    for volume_id in ("block-clone", "block-origin"):
        driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))


def test_unstage_after_a_driver_restart_detaches_what_the_first_driver_attached(
        driver: Driver, tmp_path: Path) -> None:
    cap = mount_capability("ext4")
    create(driver, "restarted", 64 * MiB, cap)
    staging = tmp_path / "staging"
    staging.mkdir()
    driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id="restarted", staging_target_path=str(staging), volume_capability=cap))
    (staging / "kept.txt").write_text("kept\n")
    assert leftovers(driver) != []

    driver.stop()
    driver.start()
    assert "event=csi.attach_method method=fuse" in driver.log()
    # Staging again is idempotent: the record says it is staged there already.
    driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id="restarted", staging_target_path=str(staging), volume_capability=cap))
    for _ in range(2):  # and so is unstaging
        driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id="restarted", staging_target_path=str(staging)))
    assert leftovers(driver) == []
    assert not (staging / "kept.txt").exists()

    # Staged again, the file system is found, not made again: the file is still there.
    driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id="restarted", staging_target_path=str(staging), volume_capability=cap))
    try:
        assert (staging / "kept.txt").read_text() == "kept\n"
        with pytest.raises(grpc.RpcError) as refused:
            driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="restarted"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id="restarted", staging_target_path=str(staging)))
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="restarted"))


def test_a_staged_volume_rides_out_a_controller_restart(driver: Driver, tmp_path: Path) -> None:
    cap = block_capability()
    create(driver, "survives", 16 * MiB, cap)
    node = Node(driver, tmp_path / "kubelet")
    try:
        device = node.attach("survives", cap)
        before = os.urandom(MiB)
        with open(device, "r+b") as f:
            f.write(before)
            f.flush()
            os.fsync(f.fileno())
        controller = driver.cluster.status()["controller"]
        os.kill(int(str(controller["pid"])), signal.SIGKILL)
        done = driver.cluster.up()  # the controller again, on its recorded ports
        assert done.returncode == 0, done.stderr
        after = os.urandom(MiB)
        with open(device, "r+b") as f:
            f.seek(MiB)
            f.write(after)
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            assert f.read(2 * MiB) == before + after
    finally:
        node.detach_all()
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="survives"))


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_an_offline_expansion_grows_the_file_system_after_the_next_stage_and_keeps_its_files(
        driver: Driver, tmp_path: Path, fs_type: str) -> None:
    node = Node(driver, tmp_path / "kubelet")
    cap = mount_capability(fs_type)
    name = f"expand-{fs_type}"
    try:
        volume = create(driver, name, 320 * MiB, cap)
        mounted = Path(node.attach(volume.volume_id, cap))
        written = write_tree(mounted)
        before = os.statvfs(mounted)
        # Grown while staged: the attached device keeps its old size (NBD cannot tell it),
        # and the node says so instead of pretending.
        grown = driver.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=640 * MiB),
            volume_capability=cap))
        assert (grown.capacity_bytes, grown.node_expansion_required) == (640 * MiB, True)
        with pytest.raises(grpc.RpcError) as caught:
            driver.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
                volume_id=volume.volume_id, volume_path=str(mounted),
                capacity_range=csi_pb2.CapacityRange(required_bytes=640 * MiB)))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stage it again" in (caught.value.details() or "")
        # What the CO does for an OFFLINE plugin: stage again, then expand on the node.
        node.detach_all()
        mounted = Path(node.attach(volume.volume_id, cap))
        expanded = driver.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume.volume_id, volume_path=str(mounted),
            staging_target_path=node.staged[-1][1],
            capacity_range=csi_pb2.CapacityRange(required_bytes=640 * MiB)))
        assert expanded.capacity_bytes == 640 * MiB
        after = os.statvfs(mounted)
        assert after.f_blocks * after.f_frsize > 1.8 * before.f_blocks * before.f_frsize
        assert read_tree(mounted, list(written)) == written
        (mounted / "after.bin").write_bytes(os.urandom(MiB))
    finally:
        node.detach_all()
    assert leftovers(driver) == []
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=name))
