"""Run every benchmark in sequence (what `make bench` runs); each writes benchmarks/results/<name>.json.

    python benchmarks/run_all.py            # the full suite (~10-15 min on a 2-core machine)
    python benchmarks/run_all.py --quick    # reduced configurations (~3 min)
    python benchmarks/run_all.py --only fidelity,throughput

Measured benchmarks (fidelity, throughput) spawn gloo processes on this machine; the others are cost-model
predictions or planner timings. A benchmark that fails is reported and the rest still run; the exit status is
non-zero if any failed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, print_table  # noqa: E402

# name -> (script, quick args, full args); planner_time/planner_throughput have no --quick (they are fast).
BENCHMARKS = {
    "fidelity": ("fidelity.py", ["--quick"], []),
    "throughput": ("throughput.py", ["--quick"], []),
    "simulate_table": ("simulate_table.py", ["--quick"], []),
    "planner_time": ("planner_time.py", [], []),
    "planner_throughput": ("planner_throughput.py", [], []),
    "published": ("published.py", [], []),
    "router_imbalance": ("router_imbalance.py", ["--trials", "2"], []),
}


def plan_commands(quick: bool, only: list[str] | None = None) -> list[tuple[str, list[str]]]:
    names = only or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"run_all: unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    out = []
    for n in names:
        script, q, full = BENCHMARKS[n]
        out.append((n, [sys.executable, str(HERE / script), *(q if quick else full)]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each benchmark's reduced configuration")
    ap.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    a = ap.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    summary, failed = [], 0
    for name, cmd in plan_commands(a.quick, a.only.split(",") if a.only else None):
        print(f"\n===== {name}: {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))} =====",
              flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        summary.append([name, "ok" if rc == 0 else f"FAILED (rc {rc})", f"{time.perf_counter() - t:.0f}"])
        failed += rc != 0
    print()
    print_table(["benchmark", "status", "seconds"], summary, align="llr", title="benchmarks/results/<name>.json:")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
