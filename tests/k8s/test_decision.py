"""The VolumeRefresh decision, case by case: a pure function, no cluster."""

from __future__ import annotations

from dataclasses import replace

import pytest

from volkin.k8s.decision import (
    Cluster,
    Decision,
    Handle,
    Job,
    Phase,
    Report,
    Resolution,
    Spec,
    Start,
    Status,
    Unresolved,
    Volume,
    after_start_error,
    decide,
)

SPEC = Spec(target_pvc="db-staging", source_pvc="db-prod", rate=1 << 20)
T, S = Handle("pvc-t"), Handle("pvc-s")
GIB = 1 << 30
NEW = Status()


def cluster(*jobs: Job, connections: int = 0, source_size: int = GIB,
            source_block: int = 65536) -> Cluster:
    return Cluster(volumes={"pvc-t": Volume("pvc-t", GIB, 65536, connections),
                            "pvc-s": Volume("pvc-s", source_size, source_block)},
                   jobs={j.id: j for j in jobs})


def job(id: str, state: str = "running", target: str = "pvc-t", source: str = "pvc-s",
        kind: str = "refresh", **more: object) -> Job:
    return Job(id, kind, state, target, source, blocks_total=16384, **more)  # type: ignore[arg-type]


def run(status: Status = NEW, target: Resolution = T, source: Resolution = S,
        state: Cluster | None = None, spec: Spec = SPEC) -> Decision:
    return decide(spec, status, target, source, state or cluster())


def reported(decision: Decision) -> Status:
    assert isinstance(decision, Report), decision
    return decision.status


# -- before the start -----------------------------------------------------------------
def test_a_new_resource_starts_a_refresh_of_the_target_volume_from_the_source_volume() -> None:
    decision = run(state=cluster(job("j3", "done"), job("j7", "done", target="other")))
    assert isinstance(decision, Start)
    assert (decision.target, decision.source, decision.rate) == ("pvc-t", "pvc-s", 1 << 20)
    assert decision.status.phase is Phase.PENDING
    assert decision.status.started_after == 7  # the newest job the controller knew


def test_a_refresh_from_a_volume_snapshot_uses_the_snapshot_handle_as_source() -> None:
    spec = Spec(target_pvc="db", source_snapshot="db-before-upgrade")
    state = Cluster(volumes={"pvc-t": Volume("pvc-t", GIB, 65536),
                             "snap-1": Volume("snap-1", GIB, 65536)}, jobs={})
    decision = run(spec=spec, source=Handle("snap-1"), state=state)
    assert isinstance(decision, Start) and decision.source == "snap-1"


def test_a_target_pvc_that_is_not_bound_yet_keeps_the_resource_pending() -> None:
    status = reported(run(target=Unresolved("not bound to a volume yet")))
    assert status.phase is Phase.PENDING
    assert status.message == "target PVC db-staging: not bound to a volume yet"


def test_a_source_of_another_csi_driver_fails_for_good() -> None:
    status = reported(run(source=Unresolved("not a volkin volume", final=True)))
    assert status.phase is Phase.FAILED and "source PVC db-prod" in status.message


def test_a_target_that_is_its_own_source_fails() -> None:
    status = reported(run(source=T))
    assert status.phase is Phase.FAILED and "same volume pvc-t" in status.message


def test_a_volume_handle_that_volkin_does_not_know_fails() -> None:
    status = reported(run(source=Handle("gone")))
    assert status.phase is Phase.FAILED
    assert status.message == "the source volume gone does not exist in volkin"


@pytest.mark.parametrize("size, block", [(2 * GIB, 65536), (GIB, 4096)])
def test_volumes_of_different_size_or_block_size_fail_before_any_call(size: int,
                                                                     block: int) -> None:
    status = reported(run(state=cluster(source_size=size, source_block=block)))
    assert status.phase is Phase.FAILED and status.message.startswith("sizes differ")


def test_a_target_in_use_by_an_nbd_client_waits_and_starts_nothing() -> None:
    status = reported(run(state=cluster(connections=1)))
    assert status.phase is Phase.WAITING
    assert "in use (1 NBD connection(s))" in status.message
    assert status.job_id == "" and status.started_after is None


def test_a_target_free_again_starts_the_refresh() -> None:
    waiting = reported(run(state=cluster(connections=2)))
    assert isinstance(run(waiting), Start)


def test_a_target_still_being_copied_by_another_job_waits_for_it() -> None:
    status = reported(run(state=cluster(job("j4", "running", source="clone-origin",
                                            kind="materialize"))))
    assert status.phase is Phase.WAITING and "job j4 (materialize" in status.message


# -- the start and its repetition -----------------------------------------------------
def started(marker: int = 7) -> Status:
    return Status(phase=Phase.PENDING, started_after=marker, target_volume="pvc-t",
                  source_volume="pvc-s")


def test_a_start_whose_job_id_was_not_recorded_adopts_the_job_instead_of_starting_again(
) -> None:
    status = reported(run(started(7), state=cluster(job("j5", "done"), job("j8", "running"))))
    assert status.job_id == "j8" and status.phase is Phase.RUNNING


def test_an_older_refresh_of_the_same_pair_is_not_taken_for_ours() -> None:
    decision = run(started(7), state=cluster(job("j5", "done")))
    assert isinstance(decision, Start)  # j5 was before our marker: the start never happened
    assert decision.status.started_after == 5


def test_a_start_the_controller_never_saw_is_made_again() -> None:
    assert isinstance(run(started(7), state=cluster()), Start)


def test_an_unreachable_controller_at_start_keeps_it_pending_for_a_retry() -> None:
    status = after_start_error(started(), "UNAVAILABLE", "controller c1 is a standby")
    assert status.phase is Phase.PENDING and status.started_after == 7
    assert "retrying" in status.message


def test_a_refusal_by_the_controller_fails_with_its_message() -> None:
    status = after_start_error(started(), "FAILED_PRECONDITION", "sizes differ")
    assert status.phase is Phase.FAILED
    assert status.message == "refused by volkin (FAILED_PRECONDITION): sizes differ"


# -- following the job ----------------------------------------------------------------
def tracking(job_id: str = "j8") -> Status:
    return replace(started(), job_id=job_id)


def test_a_running_job_reports_running_with_its_progress() -> None:
    status = reported(run(tracking(), state=cluster(job("j8", blocks_done=4096))))
    assert status.phase is Phase.RUNNING
    assert (status.blocks_done, status.blocks_total, status.percent) == (4096, 16384, 25)


def test_a_job_waiting_for_an_agent_reports_waiting_with_the_reason() -> None:
    status = reported(run(tracking(), state=cluster(job("j8", "waiting",
                                                        reason="agent a2 unreachable"))))
    assert status.phase is Phase.WAITING and "agent a2 unreachable" in status.message


def test_a_paused_job_reports_waiting_and_how_to_resume() -> None:
    status = reported(run(tracking(), state=cluster(job("j8", "paused"))))
    assert status.phase is Phase.WAITING and "volkin job resume j8" in status.message


def test_a_finished_job_succeeds_at_one_hundred_percent() -> None:
    status = reported(run(tracking(), state=cluster(job("j8", "done", blocks_done=16384))))
    assert status.phase is Phase.SUCCEEDED and status.percent == 100


def test_a_job_superseded_by_a_newer_refresh_is_a_failure_not_a_success() -> None:
    # The controller reports a superseded job as cancelled, with the reason in `error`
    # (controllers before that said done, with the same kind of reason).
    for state, error in (("cancelled", "superseded by refresh j9 (from pvc-x)"),
                         ("done", "superseded by a newer refresh")):
        status = reported(run(tracking(), state=cluster(job("j8", state, error=error))))
        assert status.phase is Phase.FAILED and "superseded" in status.message
        assert "volkin job resume" not in status.message


def test_a_failed_job_fails_the_resource_with_the_jobs_error() -> None:
    status = reported(run(tracking(), state=cluster(job("j8", "failed",
                                                        error="its target pvc-t was deleted"))))
    assert status.phase is Phase.FAILED and "its target pvc-t was deleted" in status.message


def test_a_cancelled_job_fails_the_resource_and_says_how_to_finish_the_copy() -> None:
    status = reported(run(tracking(), state=cluster(job("j8", "cancelled"))))
    assert status.phase is Phase.FAILED and "volkin job resume j8" in status.message


def test_a_job_lost_by_the_controller_fails_and_says_how_to_refresh_again() -> None:
    status = reported(run(tracking(), state=cluster(job("j2", "done"))))
    assert status.phase is Phase.FAILED
    assert "job j8 is unknown to the controller" in status.message
    assert "re-create" in status.message


def test_a_target_in_use_after_the_start_does_not_stop_the_running_refresh() -> None:
    status = reported(run(tracking(), state=cluster(job("j8"), connections=3)))
    assert status.phase is Phase.RUNNING


def test_a_finished_resource_is_left_alone_whatever_volkin_says() -> None:
    done = replace(tracking(), phase=Phase.SUCCEEDED, message="pvc-t is a full copy of pvc-s")
    assert reported(run(done, state=cluster())) == done


CASES = [Status(), started(), tracking()]


@pytest.mark.parametrize("state", [cluster(), cluster(job("j8")), cluster(job("j8", "done")),
                                   cluster(connections=1)])
@pytest.mark.parametrize("status", CASES)
def test_deciding_again_on_what_was_decided_changes_nothing(status: Status,
                                                            state: Cluster) -> None:
    first = run(status, state=state)
    if isinstance(first, Start):
        return  # a start changes the world; the adoption tests cover the repeat
    assert reported(run(first.status, state=state)) == first.status
