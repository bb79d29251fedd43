"""Predicted throughput of the planner's plan vs Megatron-LM (TP=8 + SP, PP=15 as docs/reference.md quotes, and
Megatron at its best pipeline depth; FP32 grads, TP comm exposed), MegaScale-style (SP+EP, PP=15) and all-EP/DP, for
internal-352b on 240..1440 H800 GPUs, sequence 8192,
global batch 720 sequences. Every plan is priced by the same model (planner/problem.py).

    python benchmarks/planner_throughput.py    # writes benchmarks/results/planner_throughput.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshplan.ir import trace  # noqa: E402
from meshplan.models import build_model, load_config  # noqa: E402
from meshplan.planner import Options, load_cluster  # noqa: E402
from meshplan.planner.simulate import fixed_recompute, simulate  # noqa: E402
from meshplan.table import format_table  # noqa: E402

GPUS = (240, 480, 720, 960, 1440)
SEQ, GLOBAL_BATCH = 8192, 720
RC = {"full": " +rc", "selective": " +sel", "none": ""}  # recompute granularity in the mesh column


def main() -> None:
    cluster = load_cluster("h800")
    graph = trace(build_model(load_config("internal-352b"), device="meta"))
    results, table = [], []
    # The baselines' activation recompute: chosen once, at the smallest scale, kept at every scale
    recompute = fixed_recompute(graph, cluster, min(GPUS), GLOBAL_BATCH, Options(seq=SEQ))
    for gpus in GPUS:
        rows = simulate(graph, cluster, gpus, GLOBAL_BATCH, Options(seq=SEQ), reference_pp=15,
                        baseline_recompute=recompute)
        planner = rows[0]
        for r in rows:
            d = {"gpus": gpus, **r.to_dict()}
            d["speedup_of_planner"] = r.breakdown.step / planner.breakdown.step  # >1: the planner is faster
            results.append(d)
            mesh = "-" if r.breakdown.step == float("inf") else \
                f"pp={r.mesh.pp} dp={r.mesh.d} mp={r.mesh.n} b={r.mesh.b}{RC[r.mesh.granularity]}"
            label = r.name if r.name == "planner" else f"{r.name} ({r.note.split(' (')[0]})"
            table.append([gpus, label, mesh, f"{r.tokens_per_s:,.0f}", f"{100 * r.mfu:.1f}%",
                          f"{d['memory_gb']:.1f}" if r.breakdown.step != float("inf") else "-",
                          "yes" if r.fits else "NO", f"{d['speedup_of_planner']:.2f}x"])
    path = ROOT / "benchmarks" / "results" / "planner_throughput.json"
    path.write_text(json.dumps({"model": "internal-352b", "cluster": "h800", "seq": SEQ, "global_batch": GLOBAL_BATCH,
                                "baseline_recompute": recompute, "rows": results}, indent=1, default=str))
    print(format_table(["GPUs", "plan", "mesh", "tokens/s", "MFU", "GB/GPU", "fits", "planner speedup"], table,
                       align="rlllrrlr"))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
