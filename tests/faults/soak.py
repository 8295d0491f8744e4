"""The fault suite as a soak: many seeded trials per fault kind, a table and JSON at the end.

    python3 -m tests.faults.soak --trials 12                 # 12 trials of each kind
    python3 -m tests.faults.soak --kinds etcd,agent --trials 5 --seed 7 --json out.json
    python3 -m tests.faults.soak --kinds split-brain --trial-seed 1234567   # replay one trial

Every channel is mutual TLS, one CA made for the soak (as the test suite does),
unless VOLKIN_TEST_TLS=0.

Trials run one after another, the kinds taking turns; each prints one line, and a
failed one its whole report. A passed trial's directory (daemon logs, data) is
deleted unless --keep; a failed one's is kept and named in its report. Exit
status 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import volkin.tls
from tests.faults.faults import KINDS
from tests.faults.results import DEFAULT_SEED, Results
from tests.faults.trial import run_trial, trial_seed
from tests.support import tls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.faults.soak",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per fault kind")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="base seed; trial i of kind K gets trial_seed(seed, K, i)")
    parser.add_argument("--kinds", default="all",
                        help=f"comma-separated fault kinds, or all: {', '.join(KINDS)}")
    parser.add_argument("--trial-seed", type=int, action="append", default=[],
                        help="run exactly this trial seed (of each kind given), for a replay")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--dir", type=Path, help="where trial directories go (default: a "
                        "new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep passed trials' directories")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every trial's report (timeline, logs), not only failed ones")
    args = parser.parse_args(argv)
    kinds = list(KINDS) if args.kinds == "all" else args.kinds.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}")
    root = args.dir or Path(tempfile.mkdtemp(prefix="volkin-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    if tls.enabled() and not os.environ.get(volkin.tls.ENV_CA):
        os.environ.update(tls.Pki.make(root / "pki").environment("node"))
        volkin.tls.configure(volkin.tls.from_env())

    plan = [(kind, seed) for seed in args.trial_seed for kind in kinds] or [
        (kind, trial_seed(args.seed, kind, i)) for i in range(args.trials) for kind in kinds]
    results = Results(args.seed)
    started = time.monotonic()
    print(f"{len(plan)} trials, base seed {args.seed}, directories under {root}, TLS "
          f"{'on' if os.environ.get(volkin.tls.ENV_CA) else 'off'}", flush=True)
    for number, (kind, seed) in enumerate(plan, 1):
        where = root / f"{number:04d}-{kind}-{seed}"
        result = run_trial(kind, seed, where)
        results.add(result)
        verdict = "ok" if result.passed else f"FAILED ({len(result.violations)} violations)"
        unavailable = ("-" if result.unavailability is None
                       else f"{result.unavailability:.2f}s")
        found = ", ".join(f"{what}: {n}" for what, n in result.found.items())
        print(f"[{number}/{len(plan)}] {kind:<20} seed={seed:<10} {verdict:<26} "
              f"unavailable {unavailable:>7}  job {result.job or '-'}  "
              f"({result.seconds:.0f}s, {result.writes} writes, {result.unknown} unknown)"
              + (f"  found {found}" if found else ""), flush=True)
        if result.passed and not args.keep:
            shutil.rmtree(where, ignore_errors=True)
        if args.verbose or not result.passed:
            print(result.report, flush=True)
        if args.json:
            args.json.write_text(results.to_json())
    print(results.table())
    print(f"{len(plan)} trials in {time.monotonic() - started:.0f}s")
    return 0 if all(t.passed for t in results.trials) else 1


if __name__ == "__main__":
    sys.exit(main())
