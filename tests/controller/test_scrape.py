"""The pieces of the controller's metrics that need no cluster: rates, families, counters."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import NbdMetrics
from controller.nbd import protocol as p
from controller.scrape import JobFigures, Snapshot, Throughput, VolumeFigures, families


def test_a_jobs_rate_is_unknown_until_two_scrapes_are_a_second_apart() -> None:
    rates = Throughput()
    assert rates.sample("j1", 100.0, 0) is None
    assert rates.sample("j1", 100.5, 65536) is None
    assert rates.sample("j1", 102.0, 131072) == 65536.0


def test_a_jobs_rate_is_measured_over_the_last_minute_of_scrapes() -> None:
    rates = Throughput()
    rates.sample("j1", 0.0, 0)
    rates.sample("j1", 30.0, 30_000_000)  # fast at first
    rates.sample("j1", 60.0, 30_000_000)  # then stalled
    # From the newest scrape at least a minute old (t=30) on: nothing was copied.
    assert rates.sample("j1", 90.0, 30_000_000) == 0.0


def test_a_job_that_paused_or_was_counted_afresh_is_measured_afresh() -> None:
    rates = Throughput()
    rates.sample("j1", 0.0, 1000)
    rates.stopped("j1")
    assert rates.sample("j1", 10.0, 2000) is None
    assert rates.sample("j1", 12.0, 500) is None  # fewer than before: a new term counted
    rates.keep([])
    assert rates.sample("j1", 20.0, 600) is None


def job(state: str, rate: float | None) -> JobFigures:
    return JobFigures("j7", "refresh", "V2", "V1", state, 100, 25, 25 * 65536, 75 * 65536,
                      0, rate)


Sample = tuple[str, frozenset[tuple[str, str]]]


def scraped(snapshot: Snapshot) -> dict[Sample, float]:
    """The snapshot as a scrape shows it: (name, labels) -> value."""
    registry = CollectorRegistry()

    class Fixed:
        def collect(self) -> list[object]:
            return list(families(snapshot))

    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def key(name: str, **labels: str) -> Sample:
    return f"volkin_controller_{name}", frozenset(labels.items())


def test_a_job_shows_one_state_of_all_and_an_eta_only_when_it_has_a_rate() -> None:
    found = scraped(Snapshot(True, 3, 4.5, (), (job("waiting", 65536.0),), {"waiting": 1}))
    labels = {"job": "j7", "kind": "refresh", "target": "V2", "source": "V1"}
    states = {state: found[key("job_state", **labels, state=state)]
              for state in ("running", "paused", "waiting", "done", "failed", "cancelled")}
    assert states == {**dict.fromkeys(states, 0.0), "waiting": 1.0}
    assert found[key("job_progress_ratio", **labels)] == 0.25
    assert found[key("job_eta_seconds", **labels)] == 75.0
    assert found[key("jobs", state="waiting")] == 1
    assert (found[key("leader")], found[key("fencing_epoch")]) == (1.0, 3.0)

    paused = scraped(Snapshot(True, 3, 4.5, (), (job("paused", 0.0),)))
    assert paused[key("job_bytes_per_second", **labels)] == 0.0
    assert key("job_eta_seconds", **labels) not in paused


def test_allocated_bytes_are_shown_only_once_learnt_with_their_age() -> None:
    known = VolumeFigures("V1", "primary", "", 8 << 20, 128, 128, 16, 0, 1, (4 << 20, 3.0))
    unknown = VolumeFigures("V2", "primary", "V1", 8 << 20, 128, 16, 0, 112, 0, None)
    found = scraped(Snapshot(True, 1, 1.0, (known, unknown)))
    assert found[key("volume_allocated_bytes", volume="V1")] == 4 << 20
    assert found[key("volume_allocated_age_seconds", volume="V1")] == 3.0
    assert key("volume_allocated_bytes", volume="V2") not in found
    assert found[key("volume_blocks_to_copy", volume="V2")] == 112
    assert found[key("volume_info", volume="V2", kind="primary", source="V1")] == 1


def test_nbd_requests_are_counted_by_operation_and_result() -> None:
    registry = CollectorRegistry()
    nbd = NbdMetrics(registry)
    started = time.perf_counter()
    nbd.answered(p.Cmd.WRITE, 0, 4096, started)
    nbd.answered(p.Cmd.WRITE, p.Errno.ENOSPC, 4096, started)
    nbd.answered(99, p.Errno.EINVAL, 0, started)  # a command NBD does not define
    nbd.unanswered(p.Cmd.FLUSH)
    text = generate_latest(registry).decode()
    assert 'volkin_controller_nbd_requests_total{op="write",result="ok"} 1.0' in text
    assert 'volkin_controller_nbd_requests_total{op="write",result="ENOSPC"} 1.0' in text
    assert 'volkin_controller_nbd_requests_total{op="other",result="EINVAL"} 1.0' in text
    assert 'volkin_controller_nbd_requests_total{op="flush",result="unanswered"} 1.0' in text
    assert 'volkin_controller_nbd_bytes_total{op="write"} 4096.0' in text  # the ok one only
    assert 'volkin_controller_nbd_request_seconds_count{op="write"} 2.0' in text
