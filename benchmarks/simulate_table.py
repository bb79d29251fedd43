"""At-scale simulation table: for each model of MegaScale-MoE's Table 2 on H800 at a few GPU counts (seq 8192,
global batch 720 sequences), the planner's plan vs Megatron-LM (TP=8+SP, best pipeline depth and PP=15 where that
divides) vs MegaScale-style (SP+EP, PP=15, BF16 grads) vs all-EP/DP (the baselines' activation recompute fixed per
model at its smallest GPU count, simulate.fixed_recompute): predicted step time, tokens/s, MFU, memory per GPU, pipeline
bubble. Everything is priced
by the one cost model (planner/simulate.py). These are PREDICTIONS of the cost model, not measurements.

GPU counts: 240, 480, 960 (multiples of 8 GPUs/node whose data-parallel factor can divide 720). A plan that does
not fit memory, or a model/GPU count with no valid mesh, is a row saying so.

    python benchmarks/simulate_table.py [--quick] [--models a,b] [--gpus 240,480]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, rel, write_json  # noqa: E402

MODELS = ("internal-352b", "mixtral-8x7b", "mixtral-8x22b", "hunyuan-large", "phi-3.5-moe", "deepseekmoe")
GPUS = (240, 480, 960)
QUICK_GPUS = (240,)
SEQ, GLOBAL_BATCH = 8192, 720


def rows_for(graph, cluster, gpus: int, global_batch: int = GLOBAL_BATCH, seq: int = SEQ,
             recompute: dict[str, bool] | None = None) -> list[dict]:
    """Row dicts for one model and GPU count; planner infeasibility becomes a row, not an exception. recompute:
    the baselines' fixed activation-recompute setting (simulate.fixed_recompute), None: per scale."""
    from meshplan.planner import Options, PlannerError
    from meshplan.planner.simulate import simulate

    try:
        rows = simulate(graph, cluster, gpus, global_batch, Options(seq=seq), reference_pp=15,
                        baseline_recompute=recompute)
    except PlannerError as e:  # simulate() raises when the planner finds nothing: still price the baselines
        return [{"plan": "planner", "feasible": False, "fits": False, "note": f"infeasible: {str(e)[:200]}"}] + \
            baseline_rows(graph, cluster, gpus, global_batch, seq, recompute)
    out = []
    planner_step = rows[0].breakdown.step
    for r in rows:
        d = r.to_dict()
        d["feasible"] = r.breakdown.step != float("inf")
        d["planner_speedup"] = (r.breakdown.step / planner_step) if d["feasible"] else None
        if not d["feasible"]:
            d["note"] = f"infeasible: {r.note}"
        out.append(d)
    return out


def baseline_rows(graph, cluster, gpus: int, global_batch: int, seq: int,
                  recompute: dict[str, bool] | None = None) -> list[dict]:
    """The baselines simulate() would have listed, for when the planner itself is infeasible."""
    from meshplan.planner import Options, PlannerError
    from meshplan.planner.baselines import baseline
    from meshplan.planner.simulate import _row

    opts, out = Options(seq=seq), []
    for kind, pp, note in (("megatron", None, "best pp"), ("megatron", 15, "pp=15 (docs/reference.md)"),
                           ("megascale", 15, "pp=15, SP+EP, bf16 grads"), ("ep_dp", None, "best pp")):
        try:
            p = baseline(kind, graph, cluster, gpus, global_batch, opts, pp=pp, recompute=(recompute or {}).get(kind))
        except PlannerError as e:
            if pp is None:
                out.append({"plan": kind, "feasible": False, "fits": False, "note": f"infeasible: {str(e)[:200]}"})
            continue
        d = _row(kind, graph, cluster, p, global_batch, seq, cluster.memory_limit, note).to_dict()
        out.append({**d, "feasible": True, "planner_speedup": None})
    return out


def run(models=MODELS, gpus=GPUS, write: bool = True, quick: bool = False) -> dict:
    from meshplan.ir import trace
    from meshplan.models import build_model, load_config
    from meshplan.planner import load_cluster

    cluster = load_cluster("h800")
    results, table = [], []
    t0 = time.perf_counter()
    from meshplan.planner import Options
    from meshplan.planner.simulate import fixed_recompute

    for name in models:
        graph = trace(build_model(load_config(name), device="meta"))
        rc = fixed_recompute(graph, cluster, min(gpus), GLOBAL_BATCH, Options(seq=SEQ))  # once per model
        for g in gpus:
            for d in rows_for(graph, cluster, g, recompute=rc):
                d = {"model": name, "gpus": g, **d}
                results.append(d)
                table.append(_table_row(d))
        print(f"{name}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    out = {"cluster": "h800", "seq": SEQ, "global_batch": GLOBAL_BATCH, "quick": quick, "rows": results,
           "wall_s": time.perf_counter() - t0}
    print_table(["model", "GPUs", "plan", "mesh", "tokens/s", "MFU", "GB/GPU", "fits", "planner speedup", "note"],
                table, align="lrllrrrlrl",
                title=f"simulated on H800, seq {SEQ}, global batch {GLOBAL_BATCH} (cost-model predictions)")
    if write:
        print(f"wrote {rel(write_json('simulate_table', out))}")
    return out


def _table_row(d: dict) -> list:
    if not d.get("feasible"):
        return [d["model"], d["gpus"], d["plan"], "-", "-", "-", "-", "no", "-", d.get("note", "")[:70]]
    label = d["plan"] if d["plan"] == "planner" else f"{d['plan']} ({d['note'].split(' (')[0]})"
    mesh = f"pp={d['pp']} dp={d['dp']} mp={d['mp']} b={d['micro_batch']}x{d['microbatches']}" + \
        {"full": " +rc", "selective": " +sel", "none": ""}[d["recompute_granularity"]]
    note = "" if d["fits"] else "does NOT fit memory"
    return [d["model"], d["gpus"], label, mesh, f"{d['tokens_per_s']:,.0f}", f"{100 * d['mfu']:.1f}%",
            f"{d['memory_gb']:.1f}", "yes" if d["fits"] else "NO",
            f"{d['planner_speedup']:.2f}x" if d["planner_speedup"] else "-", note]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="240 GPUs only")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--gpus", default=None, help="comma-separated GPU counts")
    a = ap.parse_args(argv)
    gpus = tuple(int(x) for x in a.gpus.split(",")) if a.gpus else (QUICK_GPUS if a.quick else GPUS)
    run(tuple(a.models.split(",")), gpus, quick=a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
