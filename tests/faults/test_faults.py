"""Seeded fault trials against a real cluster: whatever fails, no acknowledged write is lost,
nothing the model forbids is read, no deposed controller acknowledges anything, and every
job completes once the fault is over (docs/faults.md).

CI runs a few trials of each fault kind with a fixed base seed; every trial prints its seed
and a failed one says how to replay it. More trials, another seed:

    VOLKIN_FAULT_TRIALS=20 VOLKIN_FAULT_SEED=7 python3 -m pytest tests/faults -k etcd
    python3 -m tests.faults.soak --trials 12          # the soak, with a table at the end
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.results import Results, base_seed, trials_per_kind
from tests.support.libnbd import load

try:
    load()
except ImportError as missing:  # pragma: no cover - CI installs python3-libnbd
    pytest.skip(f"fault trials need libnbd's Python binding: {missing}",
                allow_module_level=True)

from tests.faults.faults import KINDS  # after the check above: needs libnbd
from tests.faults.trial import run_trial, trial_seed

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TRIALS = trials_per_kind(2)


@pytest.mark.timeout(TRIALS * 300)
@pytest.mark.parametrize("kind", list(KINDS))
def test_after_the_fault_nothing_is_lost_nothing_forbidden_is_read_and_the_job_completes(
        kind: str, tmp_path: Path, fault_results: Results) -> None:
    failures = []
    for index in range(TRIALS):
        seed = trial_seed(base_seed(), kind, index)
        result = run_trial(kind, seed, tmp_path / f"trial-{index}-{seed}")
        fault_results.add(result)
        print(f"{kind} trial {index} seed={seed}: {'ok' if result.passed else 'FAILED'}, "
              f"unavailable {result.unavailability}s, job {result.job}, {result.seconds}s")
        if not result.passed:
            failures.append(result.report)
    assert not failures, "\n\n".join(failures)
