"""Kubernetes' side of the operator: PVC → PV → CSI volume handle, VolumeSnapshot →
VolumeSnapshotContent → snapshot handle, and the VolumeRefresh status write.

`pvc_handle` and `snapshot_handle` are pure (objects in, `Resolution` out); `KubeReader`
fetches the objects with the official client and is the only part that needs an API
server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from volkin.k8s import CSI_DRIVER, GROUP, PLURAL, VERSION
from volkin.k8s.decision import Handle, Resolution, Unresolved

Obj = Mapping[str, Any]
SNAPSHOT_GROUP, SNAPSHOT_VERSION = "snapshot.storage.k8s.io", "v1"


def pvc_handle(name: str, pvc: Obj | None, pv: Obj | None) -> Resolution:
    """The volkin volume behind PVC `name` (its PV's CSI volume handle)."""
    if pvc is None:
        return Unresolved("not found")
    volume_name = (pvc.get("spec") or {}).get("volumeName")
    if (pvc.get("status") or {}).get("phase") != "Bound" or not volume_name:
        return Unresolved("not bound to a volume yet")
    if pv is None:
        return Unresolved(f"its PersistentVolume {volume_name} is not found")
    csi = (pv.get("spec") or {}).get("csi") or {}
    if csi.get("driver") != CSI_DRIVER:
        return Unresolved(f"its PersistentVolume {volume_name} is not a volkin volume "
                          f"(driver {csi.get('driver') or 'none'}, not {CSI_DRIVER})",
                          final=True)
    handle = csi.get("volumeHandle")
    return Handle(str(handle)) if handle else Unresolved(
        f"its PersistentVolume {volume_name} has no volume handle", final=True)


def snapshot_handle(name: str, snapshot: Obj | None, content: Obj | None) -> Resolution:
    """The volkin snapshot behind VolumeSnapshot `name` (its content's snapshot handle)."""
    if snapshot is None:
        return Unresolved("not found")
    status = snapshot.get("status") or {}
    content_name = status.get("boundVolumeSnapshotContentName")
    if not content_name:
        return Unresolved("not bound to a VolumeSnapshotContent yet")
    if not status.get("readyToUse"):
        return Unresolved("not ready to use yet")
    if content is None:
        return Unresolved(f"its VolumeSnapshotContent {content_name} is not found")
    driver = (content.get("spec") or {}).get("driver")
    if driver != CSI_DRIVER:
        return Unresolved(f"its VolumeSnapshotContent {content_name} is not a volkin "
                          f"snapshot (driver {driver or 'none'}, not {CSI_DRIVER})", final=True)
    handle = (content.get("status") or {}).get("snapshotHandle")
    return Handle(str(handle)) if handle else Unresolved(
        f"its VolumeSnapshotContent {content_name} has no snapshot handle yet")


class Kube(Protocol):
    """What the operator reads and writes in Kubernetes (a fake in tests)."""

    def resolve_pvc(self, namespace: str, name: str) -> Resolution: ...
    def resolve_snapshot(self, namespace: str, name: str) -> Resolution: ...
    def write_status(self, namespace: str, name: str, status: dict[str, Any]) -> None: ...


class KubeReader:
    """`Kube` on a real API server (in-cluster service account, else ~/.kube/config)."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        self._core = client.CoreV1Api()
        self._custom = client.CustomObjectsApi()
        self._api_error = client.exceptions.ApiException
        self._plain = client.ApiClient().sanitize_for_serialization

    def _get(self, call: Any, *args: Any) -> Obj | None:
        """The object as the API has it (camelCase), None if there is none."""
        try:
            found = call(*args)
        except self._api_error as exc:
            if exc.status == 404:
                return None
            raise
        if isinstance(found, Mapping):
            return found
        plain: Obj = self._plain(found)  # type: ignore[no-untyped-call]
        return plain

    def resolve_pvc(self, namespace: str, name: str) -> Resolution:
        pvc = self._get(self._core.read_namespaced_persistent_volume_claim, name, namespace)
        volume_name = ((pvc or {}).get("spec") or {}).get("volumeName")
        pv = self._get(self._core.read_persistent_volume, volume_name) if volume_name else None
        return pvc_handle(name, pvc, pv)

    def resolve_snapshot(self, namespace: str, name: str) -> Resolution:
        snapshot = self._get(self._custom.get_namespaced_custom_object, SNAPSHOT_GROUP,
                             SNAPSHOT_VERSION, namespace, "volumesnapshots", name)
        content_name = ((snapshot or {}).get("status") or {}).get(
            "boundVolumeSnapshotContentName")
        content = self._get(self._custom.get_cluster_custom_object, SNAPSHOT_GROUP,
                            SNAPSHOT_VERSION, "volumesnapshotcontents",
                            content_name) if content_name else None
        return snapshot_handle(name, snapshot, content)

    def write_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status})

