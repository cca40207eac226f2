"""Long drills that do not fit the test suite's time budget.

    python bench/drills.py fuzz [--examples-per-target 25000] [--json out.json]
    python bench/drills.py faults

``faults`` runs the crash drills of ``tests/test_swarm_faults.py`` (real processes on 127.0.0.1)
and prints each one's ``DRILL`` lines: what was injected, seconds until every verifier completed
another step, and the micro-batch accounting (lost must be 0).

``fuzz`` runs ``tests/test_fuzz.py`` (the same properties CI checks with a few hundred examples)
with 25,000 generated inputs per target, 100,000 in all: mutated signed frames, well-formed but
hostile messages (another key, wrong run, replays, stale steps, NaN/Inf, wrong shape or dtype),
DHT records (arbitrary content, forged, misbound, foreign run, garbage, unsigned) and manifests.
It prints, per target, the inputs tried, rejected (by reason), accepted, and the crashes (a test
failure: an exception other than the documented ones, or an invalid input accepted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fuzz(examples: int, out: Path | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "SENTINEL_FUZZ_EXAMPLES": str(examples), "SENTINEL_FUZZ_REPORT": str(report)}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(REPO / "tests" / "test_fuzz.py")], cwd=REPO, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        counts = json.loads(report.read_text()) if report.exists() else {}
    failed = proc.returncode != 0
    print(f"{'target':<10} {'tried':>8} {'rejected':>9} {'accepted':>9}  rejections by reason")
    total = 0
    for target, c in counts.items():
        rejected = sum(v for k, v in c.items() if k.startswith("rejected"))
        reasons = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(c.items()) if k.startswith("rejected:"))
        print(f"{target:<10} {c['tried']:>8} {rejected:>9} {c.get('accepted', 0):>9}  {reasons}")
        total += c["tried"]
    print(f"{total} inputs in {seconds:.0f} s; crashes or invalid inputs accepted: "
          f"{'SEE FAILURES BELOW' if failed else 0}")
    if failed:
        print(proc.stdout[-5000:], proc.stderr[-2000:])
    if out:
        out.write_text(json.dumps({"examples_per_target": examples, "seconds": seconds, "counts": counts,
                                   "failed": failed}, indent=1))
    return 1 if failed else 0


def faults() -> int:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_swarm_faults.py")], cwd=REPO, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.lstrip(".").startswith("DRILL"):
            print(line.lstrip("."))
    print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:])
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="drill", required=True)
    f = sub.add_parser("fuzz", help="100,000 hostile inputs through the codec, checks, validators and parser")
    f.add_argument("--examples-per-target", type=int, default=25_000)
    f.add_argument("--json", type=Path)
    sub.add_parser("faults", help="the crash drills on a live local swarm, with recovery times")
    a = p.parse_args(argv)
    if a.drill == "faults":
        return faults()
    return fuzz(a.examples_per_target, a.json)


if __name__ == "__main__":
    sys.exit(main())
