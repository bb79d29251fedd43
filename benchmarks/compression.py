"""Communication compression on real processes: bytes per step, step time and the loss-curve gap, with and
without compression, on gloo with 2 and 4 ranks (torch.multiprocessing, one process per rank).

Every variant of one world size trains its own copy of the tiny model (configs/models/tiny.yaml) inside the same
processes, the variants' steps interleaved, so they share the machine's conditions; step time is the median
over the measured steps (a barrier before and after each), bytes are what rank 0 sent per step (comm_stats,
counted at every gloo call), the gap is the largest difference of 10-step mean losses from the fp32 variant.

    python benchmarks/compression.py            # writes benchmarks/results/compression.json, prints a table
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from meshplan.ir import Mesh, Plan, trace  # noqa: E402
from meshplan.models import build_model, load_config  # noqa: E402
from meshplan.runtime import ParallelModel  # noqa: E402
from meshplan.runtime.launch import spawn  # noqa: E402
from meshplan.table import format_table  # noqa: E402

STEPS, WARMUP, BATCH, SEQ, LR = 120, 5, 8, 64, 3e-3
FP8_ACT = {"in0": "fp8", "in1": "fp8", "qkv_a2a": "fp8", "out_a2a": "fp8", "dispatch": "fp8"}
VARIANTS = {  # name -> plan precision of every op (the collectives an op lacks are ignored)
    "fp32": {},
    "bf16 grads": {"grad": "bf16"},
    "fp8 dispatch": {"dispatch": "fp8"},
    "fp8 act + bf16 grads": {**FP8_ACT, "grad": "bf16"},
    "fp32, init seed 1": {},  # not a compression: the loss gap that a different seed alone makes, for scale
}
SEEDS = {"fp32, init seed 1": 1}
BUDGETS = (0.0, 0.02, 0.2, 0.3, 0.4, None)  # the planner's choice on internal-352b, 1440 x H800
MESHES = {2: Mesh.of(mp=2), 4: Mesh.of(dp=2, mp=2)}


def _window_gap(a: list[float], b: list[float], w: int = 10) -> float:
    return max(abs(statistics.fmean(a[i:i + w]) - statistics.fmean(b[i:i + w])) for i in range(0, len(a), w))


def worker(rank: int, world: int, outdir: str) -> None:
    torch.manual_seed(0)
    cfg = load_config("tiny")
    graph = trace(build_model(cfg, device="meta"))
    mesh = MESHES[world]
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen) for _ in range(8)]
    runs = {}
    for name, prec in VARIANTS.items():
        plan = Plan.build(graph, mesh, {"attention": "sp", "moe": "ep"}, axis="auto", precision=prec)
        pm = ParallelModel(build_model(cfg, seed=SEEDS.get(name, 0)), plan, graph=graph, timeout_s=120)
        runs[name] = dict(pm=pm, opt=torch.optim.Adam(pm.parameters(), lr=LR), loss=[], time=[], bytes=[])
    for step in range(STEPS):
        batch = data[step % len(data)]
        for name, r in runs.items():  # interleaved: every variant sees the same machine state
            pm = r["pm"]
            pm.comm_stats.reset()
            dist.barrier()
            t = time.perf_counter()
            loss = F.cross_entropy(pm(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            r["opt"].zero_grad()
            loss.backward()
            pm.reduce_gradients()
            r["opt"].step()
            dist.barrier()
            r["time"].append(time.perf_counter() - t)
            r["loss"].append(loss.item())
            st = pm.comm_stats
            # the logits' gather to every rank (op "return") is the loss's, not the plan's, and stays fp32
            r["bytes"].append({**st.by_phase(), "output_gather": st.total(op="return")})
    if rank == 0:
        out = {}
        base = runs["fp32"]
        for name, r in runs.items():
            last = r["bytes"][-1]
            total = sum(v for k, v in last.items() if k != "output_gather")
            out[name] = {"precision": VARIANTS[name], "bytes_per_step": total,
                         "plan_bytes_per_step": total - last["output_gather"],
                         "bytes_by_phase": last, "step_time_ms": 1e3 * statistics.median(r["time"][WARMUP:]),
                         "loss_first": r["loss"][0], "loss_last10": statistics.fmean(r["loss"][-10:]),
                         "loss_gap_vs_fp32": _window_gap(r["loss"], base["loss"]), "loss": r["loss"]}
        Path(outdir, f"world{world}.json").write_text(json.dumps(out))


def planner_choices() -> dict:
    """Which precisions `meshplan plan internal-352b --gpus 1440 --error-budget B` picks, counted per
    (op kind, collective, precision), with the step time and the error model's total."""
    from collections import Counter

    from meshplan.planner import Options, load_cluster, plan_model

    graph = trace(build_model(load_config("internal-352b"), device="meta"))
    out = {}
    for budget in BUDGETS:
        plan, r = plan_model(graph, load_cluster("h800"), 1440, 720, Options(seq=8192, error_budget=budget))
        counts = Counter()
        for name, op in plan.ops.items():
            for coll, dt in op.precision.items():
                counts[f"{name.split('.')[-1] if name.startswith('layers.') else name}.{coll}={dt}"] += 1
        s = plan.meta["planner"]
        out[str(budget)] = {"step_time_s": s["step_time_s"], "error": s["error"], "mesh": str(r.mesh),
                            "precisions": dict(sorted(counts.items()))}
    return out


def main() -> None:
    results = {"model": "tiny", "batch": BATCH, "seq": SEQ, "steps": STEPS, "backend": "gloo (CPU)",
               "meshes": {w: str(m) for w, m in MESHES.items()}, "worlds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for world in MESHES:
            t = time.perf_counter()
            spawn(world, worker, tmp, backend="gloo")
            results["worlds"][world] = json.loads(Path(tmp, f"world{world}.json").read_text())
            print(f"{world} ranks: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    results["planner_internal_352b_1440xh800"] = planner_choices()
    rows = []
    for world, by in results["worlds"].items():
        base = by["fp32"]
        for name, r in by.items():
            rows.append([world, name, r["bytes_per_step"],
                         round(r["plan_bytes_per_step"] / base["plan_bytes_per_step"], 3),
                         round(r["bytes_by_phase"].get("grad", 0) / max(1, base["bytes_by_phase"].get("grad", 0)), 3),
                         round(r["step_time_ms"], 1), round(r["loss_last10"], 4), round(r["loss_gap_vs_fp32"], 4)])
    print(format_table(["ranks", "variant", "bytes/step (rank 0)", "vs fp32 (w/o logits gather)", "grad bytes vs fp32",
                        "step ms (median)", "loss (last 10)", "max 10-step loss gap"], rows))
    for budget, r in results["planner_internal_352b_1440xh800"].items():
        low = sorted({k for k in r["precisions"] if not k.endswith("=fp32")})
        print(f"error budget {budget}: step {r['step_time_s']:.4g} s, error {r['error']:.3g}, compressed: "
              f"{', '.join(low) or 'none'}")
    out = ROOT / "benchmarks" / "results" / "compression.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
