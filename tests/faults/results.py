"""Verdicts and unavailability of fault trials, per kind: a table for people, JSON for docs.

Kept apart from the trial machinery so that it imports without libnbd.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from tests.faults.model import summary

MAX_REPORTED = 15
DEFAULT_SEED = 20261125


def base_seed() -> int:
    """The run's base seed: env VOLKIN_FAULT_SEED, else a fixed one (so CI is repeatable)."""
    return int(os.environ.get("VOLKIN_FAULT_SEED") or DEFAULT_SEED)


def trials_per_kind(default: int) -> int:
    """Trials of each fault kind: env VOLKIN_FAULT_TRIALS, else `default`."""
    return int(os.environ.get("VOLKIN_FAULT_TRIALS") or default)


@dataclass
class TrialResult:
    kind: str
    seed: int
    violations: list[str] = field(default_factory=list)
    unavailability: float | None = None  # seconds; None if the trial did not get that far
    seconds: float = 0.0
    job: str = ""
    writes: int = 0
    unknown: int = 0
    # What went wrong, counted: bytes for data ("wrong data", "lost acknowledged write",
    # "write that must never land"), requests for "deposed ack", 1 for anything else.
    found: dict[str, int] = field(default_factory=dict)
    report: str = ""

    @property
    def passed(self) -> bool:
        return not self.violations


@dataclass
class Results:
    """Trials of a run, by fault kind: verdicts and unavailability."""

    seed: int
    trials: list[TrialResult] = field(default_factory=list)

    def add(self, result: TrialResult) -> None:
        self.trials.append(result)

    def kinds(self) -> dict[str, list[TrialResult]]:
        out: dict[str, list[TrialResult]] = {}
        for trial in self.trials:
            out.setdefault(trial.kind, []).append(trial)
        return out

    def table(self) -> str:
        lines = [f"fault trials (base seed {self.seed}): unavailability = longest time any "
                 "writer went without an acknowledgement after the fault",
                 f"{'fault':<20} {'trials':>6} {'failed':>6} {'median s':>9} {'max s':>7}  "
                 "failed seeds"]
        for kind, trials in self.kinds().items():
            stats = summary(_samples(trials))
            failed = [t.seed for t in trials if not t.passed]
            lines.append(f"{kind:<20} {len(trials):>6} {len(failed):>6} "
                         f"{stats['median']:>9.2f} {stats['max']:>7.2f}  "
                         + " ".join(map(str, failed)))
        return "\n".join(lines)

    def to_json(self) -> str:
        kinds = {}
        for kind, trials in self.kinds().items():
            kinds[kind] = {
                "trials": len(trials),
                "failed": sum(1 for t in trials if not t.passed),
                "unavailability_seconds": summary(_samples(trials)),
                "samples": [{"seed": t.seed, "passed": t.passed,
                             "unavailability": t.unavailability, "seconds": t.seconds,
                             "job": t.job, "writes": t.writes, "unknown": t.unknown,
                             "found": t.found, "violations": t.violations[:MAX_REPORTED]}
                            for t in trials]}
        return json.dumps({"seed": self.seed, "kinds": kinds}, indent=2)


def _samples(trials: Iterable[TrialResult]) -> list[float]:
    return [t.unavailability for t in trials if t.unavailability is not None]
