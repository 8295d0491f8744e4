"""The kopf handlers of the VolumeRefresh operator: a timer per resource that
reconciles it until its phase is final. Nothing here decides anything."""

from __future__ import annotations

import os
from typing import Any

import grpc
import kopf

from volkin.k8s import GROUP, PLURAL, VERSION
from volkin.k8s.decision import FINAL
from volkin.k8s.kube import KubeReader
from volkin.k8s.reconcile import reconcile
from volkin.k8s.volkin_state import VolkinAdmin

# Seconds between two reconciles of a resource that is not finished.
INTERVAL = float(os.environ.get("VOLKIN_OPERATOR_INTERVAL", "5"))
_FINAL = {phase.value for phase in FINAL}
_clients: dict[str, Any] = {}


def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our status holds what we need; kopf keeps its own bookkeeping in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = 30  # warnings and errors become Kubernetes events
    _clients["kube"] = KubeReader()
    _clients["admin"] = VolkinAdmin(os.environ["VOLKIN_CONTROLLER"])


def _cleanup(**_: Any) -> None:
    admin = _clients.pop("admin", None)
    if admin is not None:
        admin.close()


def _unfinished(*, status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in _FINAL


def _reconcile(*, name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status,
               logger: Any, **_: Any) -> None:
    try:
        now = reconcile(namespace or "", name, spec, status, _clients["kube"], _clients["admin"])
    except grpc.RpcError as exc:
        raise kopf.TemporaryError(f"volkin controller unreachable: {exc}", delay=INTERVAL) from exc
    logger.debug("VolumeRefresh %s/%s: %s %s", namespace, name,
                 now.phase.value if now.phase else "-", now.message)


# Registered without decorating, so that the functions keep their own signatures.
kopf.on.startup()(_startup)
kopf.on.cleanup()(_cleanup)
# One timer per resource, never two at once: kopf runs a resource's timer serially,
# which is what makes the start marker enough (no second reconcile races the first).
# kopf puts a finalizer on each resource so that it can stop the timer on deletion.
kopf.timer(GROUP, VERSION, PLURAL, interval=INTERVAL, when=_unfinished)(_reconcile)
