"""How long planning takes: internal-352b on H800 for 8..1440 GPUs, and for 8..120 layers on 1440 GPUs.

Planning time = everything `meshplan plan` does after tracing: build the cost model (sympy, lambdified once),
bound every mesh factorisation, solve the ILPs the bounds leave, pick the best. Each point is run REPEATS times
with a fresh cost model; min and median are reported. Tracing (once per model, on the meta device) is timed
separately. Target: internal-352b on 1440 GPUs in < 2 s.

    python benchmarks/planner_time.py          # writes benchmarks/results/planner_time.json
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshplan.ir import trace  # noqa: E402
from meshplan.models import build_model, load_config  # noqa: E402
from meshplan.planner import Options, PlannerError, load_cluster, search  # noqa: E402
from meshplan.table import format_table  # noqa: E402

REPEATS = 5
GPUS = (8, 16, 64, 120, 240, 480, 720, 960, 1440)
LAYERS = (8, 15, 30, 60, 120)
SEQ, GLOBAL_BATCH = 8192, 720


def traced(layers: int):
    cfg = dataclasses.replace(load_config("internal-352b"), n_layers=layers)
    t = time.perf_counter()
    g = trace(build_model(cfg, device="meta"))
    return g, time.perf_counter() - t


def plan_times(graph, cluster, gpus: int) -> dict:
    times, result = [], None
    for _ in range(REPEATS):
        t = time.perf_counter()
        try:
            r = search(graph, cluster, gpus, GLOBAL_BATCH, Options(seq=SEQ))
            result = {"mesh": str(r.mesh), "step_time_s": r.breakdown.step, "meshes": r.searched, "ilps": r.solved}
        except PlannerError as e:
            need = re.search(r">= ([\d.]+x memory)", str(e))
            result = {"infeasible": f"infeasible: needs {need.group(1)}" if need else str(e)[:60], "error": str(e)}
        times.append(time.perf_counter() - t)
    return {"gpus": gpus, "layers": graph.n_layers(), "min_s": min(times), "median_s": statistics.median(times),
            **result}


def main() -> None:
    cluster = load_cluster("h800")
    rows, traces = [], {}
    g60, traces[60] = traced(60)
    for gpus in GPUS:
        rows.append(plan_times(g60, cluster, gpus))
    for layers in LAYERS:
        if layers == 60:
            continue
        g, traces[layers] = traced(layers)
        rows.append(plan_times(g, cluster, 1440))
    rows.sort(key=lambda r: (r["layers"] != 60, r["layers"], r["gpus"]))
    headline = next(r for r in rows if r["gpus"] == 1440 and r["layers"] == 60)
    out = {"machine": f"{os.uname().nodename}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
           "repeats": REPEATS, "trace_s": traces, "rows": rows,
           "target": {"case": "internal-352b, 1440 x H800", "limit_s": 2.0, "min_s": headline["min_s"],
                      "median_s": headline["median_s"], "met": headline["median_s"] < 2.0}}
    path = ROOT / "benchmarks" / "results" / "planner_time.json"
    path.write_text(json.dumps(out, indent=1))
    table = [[r["layers"], r["gpus"], f"{r['min_s']:.3f}", f"{r['median_s']:.3f}",
              r.get("mesh", r.get("infeasible", ""))[:60], r.get("ilps", "-"), r.get("meshes", "-")] for r in rows]
    print(format_table(["layers", "GPUs", "min s", "median s", "mesh (or why infeasible)", "ILPs", "meshes"], table,
                       align="rrrrlrr"))
    print("tracing (meta device): " + ", ".join(f"{k} layers {v:.2f} s" for k, v in sorted(traces.items())))
    print(f"target: 1440 GPUs, 60 layers: median {headline['median_s']:.3f} s (< 2 s: {out['target']['met']}); "
          f"{out['machine']}; wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
