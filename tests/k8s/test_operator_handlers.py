"""The kopf wiring, without an API server: the handlers are registered for the CRD's
resource, the start-up settings apply, a timer reconciles only unfinished resources,
and an unreachable controller becomes kopf's retry, not a status change."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import kopf
import pytest

from volkin.k8s import GROUP, PLURAL, VERSION, operator
from volkin.k8s.decision import Cluster, Job, Start


def test_a_timer_for_volumerefreshes_is_registered() -> None:
    handlers = kopf.get_default_registry()._spawning.get_all_handlers()
    (timer,) = [h for h in handlers if h.fn is operator._reconcile]
    assert timer.selector is not None
    assert (timer.selector.group, timer.selector.version, timer.selector.any_name) == (
        GROUP, VERSION, PLURAL)
    assert timer.when is operator._unfinished


def test_startup_stores_kopfs_own_state_in_annotations_and_connects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operator, "KubeReader", lambda: "kube")
    monkeypatch.setenv("VOLKIN_CONTROLLER", "127.0.0.1:1")
    settings = kopf.OperatorSettings()
    operator._startup(settings=settings)
    try:
        assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
        assert operator._clients["kube"] == "kube"
    finally:
        operator._cleanup()


@pytest.mark.parametrize("phase, runs", [(None, True), ("Pending", True), ("Running", True),
                                         ("Waiting", True), ("Succeeded", False),
                                         ("Failed", False)])
def test_the_timer_runs_only_until_the_phase_is_final(phase: str | None, runs: bool) -> None:
    status = kopf.Status(kopf.Body({"status": {"phase": phase} if phase else {}}))
    assert operator._unfinished(status=status) is runs


class Unreachable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


class DownAdmin:
    def cluster(self) -> Cluster:
        raise Unreachable()

    def start(self, start: Start) -> Job:
        raise AssertionError("never started")


class Kube:
    def resolve_pvc(self, namespace: str, name: str) -> Any:
        from volkin.k8s.decision import Handle
        return Handle(name)

    def resolve_snapshot(self, namespace: str, name: str) -> Any:
        raise AssertionError

    def write_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        raise AssertionError("nothing is written while the controller is unreachable")


def test_an_unreachable_controller_is_a_temporary_error_for_kopf_to_retry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(operator._clients, "kube", Kube())
    monkeypatch.setitem(operator._clients, "admin", DownAdmin())
    with pytest.raises(kopf.TemporaryError):
        operator._reconcile(name="r", namespace="ns",
                            spec=kopf.Spec(kopf.Body({"spec": {"targetPVC": "t", "source": {
                                "persistentVolumeClaimName": "s"}}})),
                            status=kopf.Status(kopf.Body({})), logger=logging.getLogger("test"))
