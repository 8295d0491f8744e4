"""The VolumeRefresh custom resource's spec and status as plain dicts, and back.

Field names are those of deploy/kubernetes/volumerefresh-crd.yaml (camelCase, as
Kubernetes has them); `volkin.k8s.decision` works on the dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from volkin.k8s.decision import Phase, Spec, Status


def spec_from(body: Mapping[str, Any]) -> Spec:
    source = body.get("source") or {}
    return Spec(target_pvc=str(body.get("targetPVC", "")),
                source_pvc=str(source.get("persistentVolumeClaimName", "") or ""),
                source_snapshot=str(source.get("volumeSnapshotName", "") or ""),
                rate=int(body.get("rateBytesPerSecond", 0) or 0))


def status_from(body: Mapping[str, Any] | None) -> Status:
    body = body or {}
    progress = body.get("progress") or {}
    phase = str(body.get("phase"))
    started_after = body.get("startedAfterJob")
    return Status(phase=Phase(phase) if phase in Phase._value2member_map_ else None,
                  job_id=str(body.get("jobID", "") or ""),
                  started_after=int(started_after) if started_after is not None else None,
                  blocks_done=int(progress.get("blocksDone", 0) or 0),
                  blocks_total=int(progress.get("blocksTotal", 0) or 0),
                  message=str(body.get("message", "") or ""),
                  target_volume=str(body.get("targetVolume", "") or ""),
                  source_volume=str(body.get("sourceVolume", "") or ""))


def status_to(status: Status) -> dict[str, Any]:
    """The status subresource's body; every field present so that a patch overwrites."""
    return {
        "phase": status.phase.value if status.phase is not None else None,
        "jobID": status.job_id or None,
        "startedAfterJob": status.started_after,
        "progress": {"blocksDone": status.blocks_done, "blocksTotal": status.blocks_total,
                     "percent": status.percent},
        "message": status.message,
        "targetVolume": status.target_volume or None,
        "sourceVolume": status.source_volume or None,
    }
