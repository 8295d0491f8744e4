"""One reconcile of one VolumeRefresh: gather the inputs, decide, carry it out.

The steps, in this order (see `volkin.k8s.decision` for why):
1. resolve the target PVC and the source PVC or VolumeSnapshot to volkin names;
2. read every volume and job from the active controller;
3. decide; a `Report` writes the status if it changed;
4. a `Start` writes its Pending status with the start marker *before* StartRefresh,
   then the job id (or, if the controller refused, the status after that error).
A controller that cannot be reached raises `grpc.RpcError` before anything is
written: the caller retries later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

import grpc

from volkin.k8s.decision import Cluster, Job, Report, Start, Status, after_start_error, decide
from volkin.k8s.kube import Kube
from volkin.k8s.resource import spec_from, status_from, status_to


class Admin(Protocol):
    def cluster(self) -> Cluster: ...
    def start(self, start: Start) -> Job: ...


def reconcile(namespace: str, name: str, spec_body: Mapping[str, Any],
              status_body: Mapping[str, Any] | None, kube: Kube, admin: Admin) -> Status:
    """Brings one VolumeRefresh one step closer to its goal; returns its status now."""
    spec, status = spec_from(spec_body), status_from(status_body)
    target = kube.resolve_pvc(namespace, spec.target_pvc)
    source = (kube.resolve_pvc(namespace, spec.source_pvc) if spec.source_pvc
              else kube.resolve_snapshot(namespace, spec.source_snapshot))
    decision = decide(spec, status, target, source, admin.cluster())
    if isinstance(decision, Report):
        if decision.status != status:
            kube.write_status(namespace, name, status_to(decision.status))
        return decision.status
    # Start: the marker is stored first, so that a repeat finds this start's job.
    kube.write_status(namespace, name, status_to(decision.status))
    try:
        job = admin.start(decision)
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        after = after_start_error(decision.status, code, details or "")
        kube.write_status(namespace, name, status_to(after))
        return after
    started = replace(decision.status, job_id=job.id, blocks_total=job.blocks_total,
                      message=f"started job {job.id}: refresh of {job.target} from "
                              f"{job.source}")
    kube.write_status(namespace, name, status_to(started))
    return started
