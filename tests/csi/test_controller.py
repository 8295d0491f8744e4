"""The controller service on a real cluster: idempotent by name, capacity in whole blocks,
paginated lists, snapshots ready at once, clones by refresh, and deletes of volumes that
others still read through."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from tests.cli.conftest import DevCluster
from tests.csi.conftest import Driver, block_capability, mount_capability
from tests.support.etcd import free_port
from volkin.api.csi.v1 import csi_pb2
from volkin.csi import names

pytestmark = [pytest.mark.integration]

MiB = 1 << 20
Mode = csi_pb2.VolumeCapability.AccessMode


def refused(call: Callable[[Any], Any], request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    assert "Traceback" not in (caught.value.details() or "")
    return caught.value


def create_request(name: str, required: int = 0, limit: int = 0,
                   parameters: dict[str, str] | None = None,
                   source: csi_pb2.VolumeContentSource | None = None
                   ) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=required,
                                                        limit_bytes=limit),
        volume_capabilities=[mount_capability()], parameters=parameters or {},
        volume_content_source=source)


def from_snapshot(snapshot_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def test_create_volume_is_idempotent_by_name_and_refuses_an_incompatible_second_call(
        driver: Driver) -> None:
    first = driver.controller.CreateVolume(create_request("pvc-a", 8 * MiB)).volume
    again = driver.controller.CreateVolume(create_request("pvc-a", 8 * MiB)).volume
    assert (again.volume_id, again.capacity_bytes) == (first.volume_id, 8 * MiB)
    error = refused(driver.controller.CreateVolume, create_request("pvc-a", 32 * MiB))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    error = refused(driver.controller.CreateVolume,
                    create_request("pvc-a", 8 * MiB, parameters={"blockSize": "4096"}))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_name_volkin_does_not_take_maps_to_the_same_volume_every_time(
        driver: Driver) -> None:
    csi_name = "pvc with spaces/and ü"
    first = driver.controller.CreateVolume(create_request(csi_name, MiB)).volume
    again = driver.controller.CreateVolume(create_request(csi_name, MiB)).volume
    assert first.volume_id == again.volume_id == names.volkin_name(csi_name)
    assert names.is_volkin_name(first.volume_id)


def test_capacity_is_rounded_up_to_whole_blocks_within_the_limit(driver: Driver) -> None:
    volume = driver.controller.CreateVolume(create_request(
        "rounded", 100_000, parameters={"blockSize": "65536"})).volume
    assert volume.capacity_bytes == 131072
    assert volume.volume_context["blockSize"] == "65536"
    error = refused(driver.controller.CreateVolume, create_request(
        "no-whole-block", 100_000, 120_000, parameters={"blockSize": "65536"}))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    error = refused(driver.controller.CreateVolume, create_request(
        "bad-block", MiB, parameters={"blockSize": "1000"}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_only_single_node_access_modes_and_ext4_or_xfs_are_accepted(driver: Driver) -> None:
    for cap in (mount_capability(mode=Mode.MULTI_NODE_MULTI_WRITER),
                block_capability(mode=Mode.MULTI_NODE_READER_ONLY), mount_capability("ntfs")):
        request = csi_pb2.CreateVolumeRequest(name="nope", volume_capabilities=[cap])
        error = refused(driver.controller.CreateVolume, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, cap
    for mode in (Mode.SINGLE_NODE_READER_ONLY, Mode.SINGLE_NODE_SINGLE_WRITER):
        request = csi_pb2.CreateVolumeRequest(
            name=f"mode-{mode}", capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
            volume_capabilities=[block_capability(mode)])
        driver.controller.CreateVolume(request)


def test_list_volumes_pages_through_every_volume_and_aborts_on_a_foreign_token(
        driver: Driver) -> None:
    for i in range(5):
        driver.controller.CreateVolume(create_request(f"page-{i}", MiB))
    seen, token = [], ""
    while True:
        page = driver.controller.ListVolumes(csi_pb2.ListVolumesRequest(
            max_entries=2, starting_token=token))
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert {f"page-{i}" for i in range(5)} <= set(seen)
    assert len(seen) == len(set(seen))
    error = refused(driver.controller.ListVolumes,
                    csi_pb2.ListVolumesRequest(starting_token="not-ours"))
    assert error.code() == grpc.StatusCode.ABORTED


def test_a_snapshot_is_ready_at_once_and_listed_by_id_and_by_source(driver: Driver) -> None:
    driver.controller.CreateVolume(create_request("snap-origin", 4 * MiB))
    snapshot = driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id="snap-origin", name="snapshot-1")).snapshot
    assert snapshot.ready_to_use
    assert (snapshot.snapshot_id, snapshot.source_volume_id) == ("snapshot-1", "snap-origin")
    assert snapshot.size_bytes == 4 * MiB and snapshot.creation_time.seconds > 0
    again = driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id="snap-origin", name="snapshot-1")).snapshot
    assert again == snapshot
    driver.controller.CreateVolume(create_request("other-origin", 4 * MiB))
    error = refused(driver.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
        source_volume_id="other-origin", name="snapshot-1"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS

    by_id = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id="snapshot-1"))
    assert [e.snapshot.snapshot_id for e in by_id.entries] == ["snapshot-1"]
    by_source = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        source_volume_id="other-origin"))
    assert list(by_source.entries) == []
    # A snapshot is not a CSI volume: its id names none.
    listed = driver.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert "snapshot-1" not in {e.volume.volume_id for e in listed.entries}
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="snapshot-1"))
    assert driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id="snapshot-1")).entries


def test_a_clone_keeps_its_source_size_and_a_larger_one_is_out_of_range(
        driver: Driver) -> None:
    driver.controller.CreateVolume(create_request("clone-origin", 4 * MiB))
    driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id="clone-origin", name="clone-snap"))
    clone = driver.controller.CreateVolume(create_request(
        "clone-1", 4 * MiB, source=from_snapshot("clone-snap"))).volume
    assert clone.capacity_bytes == 4 * MiB
    assert clone.content_source.snapshot.snapshot_id == "clone-snap"
    again = driver.controller.CreateVolume(create_request(
        "clone-1", 4 * MiB, source=from_snapshot("clone-snap"))).volume
    assert again.volume_id == clone.volume_id
    error = refused(driver.controller.CreateVolume, create_request(
        "clone-1", 4 * MiB))  # the same name without the source
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    error = refused(driver.controller.CreateVolume, create_request(
        "clone-big", 8 * MiB, source=from_snapshot("clone-snap")))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    error = refused(driver.controller.CreateVolume, create_request(
        "clone-none", 4 * MiB, source=from_snapshot("no-such-snapshot")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_deleting_an_origin_first_makes_its_snapshots_real_and_they_keep_their_source(
        driver: Driver) -> None:
    driver.controller.CreateVolume(create_request("doomed", 4 * MiB))
    driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id="doomed", name="survivor"))
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="doomed"))
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="doomed"))  # again
    error = refused(driver.controller.ControllerGetVolume,
                    csi_pb2.ControllerGetVolumeRequest(volume_id="doomed"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    listed = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        source_volume_id="doomed"))
    assert [e.snapshot.snapshot_id for e in listed.entries] == ["survivor"]
    # The snapshot, now real, still makes volumes.
    driver.controller.CreateVolume(create_request(
        "after-doom", 4 * MiB, source=from_snapshot("survivor")))
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="survivor"))
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="survivor"))
    assert not driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id="survivor")).entries


def test_a_delete_that_cannot_wait_long_enough_says_which_copies_run(
        tmp_path: Any, driver: Driver) -> None:
    impatient = Driver(tmp_path / "impatient", driver.cluster, mode="controller",
                       extra=("--delete-wait", "0")).start()
    try:
        impatient.controller.CreateVolume(create_request("busy-origin", 64 * MiB))
        impatient.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            source_volume_id="busy-origin", name="busy-snap"))
        error = refused(impatient.controller.DeleteVolume,
                        csi_pb2.DeleteVolumeRequest(volume_id="busy-origin"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "busy-snap" in (error.details() or "") and "retry" in (error.details() or "")
        driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="busy-origin"))
    finally:
        impatient.stop()


def test_probe_and_plugin_info_name_the_driver(driver: Driver) -> None:
    info = driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.volkin.io" and info.vendor_version
    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    node = driver.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert node.node_id == "node1"
    assert dict(node.accessible_topology.segments) == {"topology.csi.volkin.io/node": "node1"}


def test_without_a_controller_probe_is_not_ready_and_calls_are_unavailable(
        tmp_path: Any) -> None:
    nowhere = DevCluster(tmp_path / "none")
    nowhere.env = {"VOLKIN_CONTROLLER": f"127.0.0.1:{free_port()}",
                   "VOLKIN_NBD": f"127.0.0.1:{free_port()}"}
    lonely = Driver(tmp_path / "lonely", nowhere).start()
    try:
        started = time.monotonic()
        assert not lonely.identity.Probe(csi_pb2.ProbeRequest()).ready.value
        assert time.monotonic() - started < 10
        error = refused(lonely.controller.DeleteVolume,
                        csi_pb2.DeleteVolumeRequest(volume_id="any"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        lonely.stop()


def expand_request(volume_id: str, required: int, limit: int = 0,
                   cap: csi_pb2.VolumeCapability | None = None
                   ) -> csi_pb2.ControllerExpandVolumeRequest:
    return csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=required,
                                                                  limit_bytes=limit),
        volume_capability=cap)


def test_expansion_grows_in_whole_blocks_asks_the_node_for_mounts_and_never_shrinks(
        driver: Driver) -> None:
    caps = driver.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest())
    assert csi_pb2.ControllerServiceCapability.RPC.EXPAND_VOLUME in {
        c.rpc.type for c in caps.capabilities}
    plugin = driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert [c.volume_expansion.type for c in plugin.capabilities
            if c.HasField("volume_expansion")] == [
        csi_pb2.PluginCapability.VolumeExpansion.OFFLINE]
    driver.controller.CreateVolume(create_request("grows", 4 * MiB))
    grown = driver.controller.ControllerExpandVolume(expand_request("grows", 8 * MiB + 1))
    assert (grown.capacity_bytes, grown.node_expansion_required) == (8 * MiB + 65536, True)
    block = driver.controller.ControllerExpandVolume(expand_request(
        "grows", 12 * MiB, cap=block_capability()))
    assert (block.capacity_bytes, block.node_expansion_required) == (12 * MiB, False)
    same = driver.controller.ControllerExpandVolume(expand_request("grows", 6 * MiB))
    assert same.capacity_bytes == 12 * MiB  # as large already: left as it is
    error = refused(driver.controller.ControllerExpandVolume,
                    expand_request("grows", 4 * MiB, limit=8 * MiB))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and "never shrink" in (
        error.details() or "")
    error = refused(driver.controller.ControllerExpandVolume,
                    csi_pb2.ControllerExpandVolumeRequest(volume_id="grows"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = refused(driver.controller.ControllerExpandVolume,
                    expand_request("no-such-volume", 8 * MiB))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert driver.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
        volume_id="grows")).volume.capacity_bytes == 12 * MiB
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="grows"))


def test_expanding_a_volume_with_a_snapshot_first_makes_the_snapshot_real(
        driver: Driver) -> None:
    driver.controller.CreateVolume(create_request("snapped", 4 * MiB))
    driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id="snapped", name="snapped-1"))
    grown = driver.controller.ControllerExpandVolume(expand_request("snapped", 8 * MiB))
    assert grown.capacity_bytes == 8 * MiB
    snapshot = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id="snapped-1")).entries[0].snapshot
    assert (snapshot.size_bytes, snapshot.source_volume_id) == (4 * MiB, "snapped")
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="snapped-1"))
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="snapped"))
