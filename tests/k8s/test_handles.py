"""PVC → PV → CSI volume handle, VolumeSnapshot → content → snapshot handle."""

from __future__ import annotations

from volkin.k8s import CSI_DRIVER
from volkin.k8s.decision import Handle, Phase, Status, Unresolved
from volkin.k8s.kube import pvc_handle, snapshot_handle
from volkin.k8s.resource import spec_from, status_from, status_to

BOUND = {"spec": {"volumeName": "pv-1"}, "status": {"phase": "Bound"}}


def test_a_bound_pvc_of_the_volkin_driver_resolves_to_its_volume_handle() -> None:
    pv = {"spec": {"csi": {"driver": CSI_DRIVER, "volumeHandle": "vol-1"}}}
    assert pvc_handle("a", BOUND, pv) == Handle("vol-1")


def test_a_pvc_of_another_driver_is_unresolved_for_good() -> None:
    pv = {"spec": {"csi": {"driver": "ebs.csi.aws.com", "volumeHandle": "vol-1"}}}
    assert pvc_handle("a", BOUND, pv) == Unresolved(
        "its PersistentVolume pv-1 is not a volkin volume (driver ebs.csi.aws.com, "
        "not csi.volkin.io)", final=True)
    assert pvc_handle("a", BOUND, {"spec": {"hostPath": {"path": "/x"}}}).final  # type: ignore[union-attr]


def test_a_pvc_not_found_or_not_bound_may_resolve_later() -> None:
    assert pvc_handle("a", None, None) == Unresolved("not found")
    pending = {"spec": {}, "status": {"phase": "Pending"}}
    assert pvc_handle("a", pending, None) == Unresolved("not bound to a volume yet")
    assert pvc_handle("a", BOUND, None) == Unresolved("its PersistentVolume pv-1 is not found")


SNAP = {"status": {"boundVolumeSnapshotContentName": "snapcontent-1", "readyToUse": True}}


def test_a_ready_volume_snapshot_resolves_to_its_contents_snapshot_handle() -> None:
    content = {"spec": {"driver": CSI_DRIVER}, "status": {"snapshotHandle": "snap-1"}}
    assert snapshot_handle("s", SNAP, content) == Handle("snap-1")


def test_a_volume_snapshot_not_bound_or_not_ready_may_resolve_later() -> None:
    assert snapshot_handle("s", None, None) == Unresolved("not found")
    assert snapshot_handle("s", {"status": {}}, None) == Unresolved(
        "not bound to a VolumeSnapshotContent yet")
    unready = {"status": {"boundVolumeSnapshotContentName": "c", "readyToUse": False}}
    assert snapshot_handle("s", unready, None) == Unresolved("not ready to use yet")


def test_a_snapshot_of_another_driver_is_unresolved_for_good() -> None:
    content = {"spec": {"driver": "other"}, "status": {"snapshotHandle": "x"}}
    assert snapshot_handle("s", SNAP, content).final  # type: ignore[union-attr]


def test_the_status_survives_the_round_trip_through_the_resource() -> None:
    status = Status(phase=Phase.RUNNING, job_id="j8", started_after=7, blocks_done=10,
                    blocks_total=40, message="copying", target_volume="t", source_volume="s")
    body = status_to(status)
    assert body["progress"] == {"blocksDone": 10, "blocksTotal": 40, "percent": 25}
    assert status_from(body) == status
    assert status_from(None) == Status()


def test_the_spec_names_the_source_pvc_or_snapshot() -> None:
    spec = spec_from({"targetPVC": "t", "source": {"volumeSnapshotName": "s"},
                      "rateBytesPerSecond": 5})
    assert (spec.target_pvc, spec.source_pvc, spec.source_snapshot, spec.rate) == (
        "t", "", "s", 5)
