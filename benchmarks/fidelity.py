"""Cost-model fidelity: the planner's predicted step time vs the step time measured on real gloo processes, for
every enumerated candidate plan of a small MoE model, plus the plan `meshplan.compile(..., plan="auto")` picks.

Candidates, per world size W in {2, 4}: attention {sp, tp} x MoE {ep, tp, ag_scatter} on each mesh with a model
axis ({mp:2}; {mp:4}, {dp:2,mp:2}), and pure data parallel (Plan.build(axis=None) on {dp:W}). Every candidate is
built with Plan.build (native placements, fp32 collectives) and priced with planner.price_plan on cluster "local"
(configs/clusters/local.yaml, fitted to this machine by `meshplan calibrate`), with the micro-batch set to what
the runtime executes (the whole per-replica batch in one micro-batch). The planner's pick is priced the same way.

Measurement: one spawn per world size; every rank builds a ParallelModel per plan, warms each up, then runs
`--reps` rounds, each round one timed training step (forward, cross-entropy, backward, reduce_gradients, AdamW)
of every plan in turn (interleaved, so load drift hits all plans alike). A step's time is the slowest rank's;
the plan's measured time is the median over rounds.

Reported: per plan predicted vs measured, Spearman rank correlation (per world size and pooled), median relative
error, and whether the planner's pick is the measured-fastest plan of its world size (and its measured rank).

    python benchmarks/fidelity.py [--quick] [--calibrate] [--model small] [--batch 8] [--seq 128] [--reps 7]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, median, print_table, rel, relative_errors, spearman, write_json  # noqa: E402

ATTENTION = ("sp", "tp")
MOE = ("ep", "tp", "ag_scatter")


def meshes_for(world: int) -> list[dict]:
    """Meshes with a model axis (last axis mp) for `world` ranks, plus pure data parallel."""
    out = [{"mp": world}]
    if world == 4:
        out.append({"dp": 2, "mp": 2})
    return out


def candidate_plans(graph, world: int, batch: int) -> list[tuple[str, object]]:
    """(name, Plan) for every enumerated candidate on `world` ranks; invalid ones (divisibility) are skipped."""
    from meshplan.ir import Mesh, Plan, PlanError

    plans = []
    for m in meshes_for(world):
        mesh = Mesh.of(**m)
        for a in ATTENTION:
            for e in MOE:
                p = Plan.build(graph, mesh, {"attention": a, "moe": e})
                name = f"{_mesh_str(m)} attn={a} moe={e}"
                try:
                    plans.append((name, _one_microbatch(p, graph, batch)))
                except PlanError as err:
                    print(f"skip {name}: {err}", file=sys.stderr)
    mesh = Mesh.of(dp=world)
    plans.append((f"dp:{world} pure-DP", _one_microbatch(Plan.build(graph, mesh, axis=None), graph, batch)))
    return plans


def _mesh_str(m: dict) -> str:
    return ",".join(f"{k}:{v}" for k, v in m.items())


def _one_microbatch(plan, graph, batch: int):
    """The runtime runs each replica's whole batch at once: price it as one micro-batch of batch/dp sequences."""
    model_axes = {p.axis for p in plan.ops.values() if p.axis is not None}
    n = plan.mesh.axis_size(model_axes.pop()) if model_axes else 1
    d = plan.mesh.size // n
    plan.meta = {**plan.meta, "pipeline": {"stages": 1, "layers_per_stage": [graph.n_layers()],
                                           "micro_batch_size": batch // d, "microbatches": 1}}
    plan.validate(graph, batch=batch)
    return plan


def planner_pick(model, cluster, world: int, batch: int, seq: int):
    """What meshplan.compile(model, plan="auto") runs on `world` ranks (search with pp=[1])."""
    import torch

    import meshplan

    cm = meshplan.compile(model, cluster=cluster, world_size=world,
                          example_inputs=(torch.zeros(batch, seq, dtype=torch.long),))
    return cm.plan


def predict(graph, cluster, plan, batch: int, seq: int) -> float:
    from meshplan.planner import Options, price_plan

    return price_plan(graph, cluster, plan, batch, Options(seq=seq)).breakdown.step


def _rank_main(rank: int, world: int, model_name: str, plans: list[tuple[str, str]], batch: int, seq: int,
               warmup: int, reps: int, result: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from meshplan.ir import Plan, trace
    from meshplan.models import build_model, load_config
    from meshplan.runtime import ParallelModel

    cfg = load_config(model_name)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
    tokens, targets = data[:, :-1], data[:, 1:]
    runs = []
    for name, text in plans:
        model = build_model(cfg, seed=0)
        graph = trace(model, (tokens,))
        pm = ParallelModel(model, Plan.from_dict(__import__("yaml").safe_load(text)), graph)
        runs.append((name, pm, torch.optim.AdamW(pm.parameters(), lr=1e-4)))

    def step(pm, opt):
        out = pm(tokens)
        loss = F.cross_entropy(out.flatten(0, 1).float(), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pm.reduce_gradients()
        opt.step()

    for _, pm, opt in runs:
        for _ in range(warmup):
            step(pm, opt)
    times = {name: [] for name, _, _ in runs}
    for _ in range(reps):
        for name, pm, opt in runs:
            dist.barrier()
            t = time.perf_counter()
            step(pm, opt)
            times[name].append(time.perf_counter() - t)
    everyone = [None] * world
    dist.all_gather_object(everyone, times)
    if rank == 0:
        slowest = {n: [max(r[n][i] for r in everyone) for i in range(reps)] for n in times}
        Path(result).write_text(json.dumps(slowest))


def measure(model_name: str, world: int, plans: list[tuple[str, object]], batch: int, seq: int, warmup: int,
            reps: int) -> dict[str, list[float]]:
    """{plan name: per-round step times (slowest rank)} from one spawn of `world` gloo ranks."""
    from meshplan.runtime.launch import spawn

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        spawn(world, _rank_main, model_name, [(n, p.to_yaml()) for n, p in plans], batch, seq, warmup, reps,
              str(out), timeout_s=600.0)
        return json.loads(out.read_text())


def summarize(rows: list[dict]) -> dict:
    """Spearman and median relative error over the candidate rows (the planner pick is scored separately)."""
    cands = [r for r in rows if not r["planner_pick"] and not r.get("pick_fp32_variant")]
    pred = [r["predicted_s"] for r in cands]
    meas = [r["measured_s"] for r in cands]
    return {"plans": len(cands), "spearman": spearman(pred, meas),
            "median_rel_error": median(relative_errors(pred, meas)),
            "predicted_over_measured_median": median([p / m for p, m in zip(pred, meas)])}


def pick_verdict(rows: list[dict]) -> dict:
    """Is the planner's pick the measured-fastest of its world size (candidates and pick together)?"""
    pick = next(r for r in rows if r["planner_pick"])
    order = sorted(rows, key=lambda r: r["measured_s"])
    rank = 1 + order.index(pick)
    fastest = order[0]
    return {"pick": pick["plan"], "pick_same_as": pick.get("same_strategies_as"), "pick_measured_rank": rank,
            "of": len(rows), "pick_is_measured_fastest": rank == 1, "measured_fastest": fastest["plan"],
            "pick_measured_s": pick["measured_s"], "fastest_measured_s": fastest["measured_s"],
            "pick_slowdown_vs_fastest": pick["measured_s"] / fastest["measured_s"]}


def _strategy_key(plan) -> tuple:
    """Mesh sizes (model axis, data parallel) and per-op strategies, ignoring axis names and precisions."""
    axes = {p.axis for p in plan.ops.values() if p.axis is not None}
    n = plan.mesh.axis_size(axes.pop()) if axes else 1
    return (n, plan.mesh.size // n, tuple(sorted((k, v.strategy if v.axis else "dp") for k, v in plan.ops.items())))


def describe(plan, graph) -> str:
    """Short label: mesh sizes, strategy per op kind (attention, moe, ffn), non-fp32 collective precisions."""
    n, d, _ = _strategy_key(plan)
    kinds = {}
    for op in graph.ops():
        if op.name in plan.ops and op.kind in ("attention", "moe", "ffn"):
            kinds.setdefault(op.kind, set()).add(plan.ops[op.name].strategy)
    strat = " ".join(f"{'attn' if k == 'attention' else k}={'/'.join(sorted(v))}" for k, v in kinds.items())
    prec = sorted({d_ for p in plan.ops.values() for d_ in p.precision.values() if d_ != "fp32"})
    return f"dp:{d},mp:{n} {strat}" + (f" [{'+'.join(prec)}]" if prec else " [fp32]")


def without_precision(plan):
    import copy

    p = copy.deepcopy(plan)
    for op in p.ops.values():
        op.precision.clear()
    return p


def run(model_name: str = "small", worlds=(2, 4), batch: int = 8, seq: int = 128, warmup: int = 2, reps: int = 7,
        cluster_name: str = "local", calibrate: bool = False, write: bool = True, quick: bool = False) -> dict:
    import torch

    from meshplan.ir import trace
    from meshplan.models import build_model, load_config
    from meshplan.planner import load_cluster

    if calibrate:
        from meshplan.measure.calibrate import calibrate as do_calibrate

        path = RESULTS / "local_calibrated.yaml"
        RESULTS.mkdir(parents=True, exist_ok=True)
        do_calibrate(out=path)
        cluster_name = str(path)
    cluster = load_cluster(cluster_name)
    model = build_model(load_config(model_name), seed=0)
    graph = trace(model, (torch.zeros(batch, seq, dtype=torch.long),))
    all_rows, per_world = [], {}
    t0 = time.perf_counter()
    for world in worlds:
        plans = candidate_plans(graph, world, batch)
        keys = {_strategy_key(p): n for n, p in plans}
        pick = _one_microbatch(planner_pick(model, cluster, world, batch, seq), graph, batch)
        plans.append((f"pick, fp32: {describe(pick, graph).rsplit(' [', 1)[0]}", without_precision(pick)))
        plans.append((f"PICK: {describe(pick, graph)}", pick))
        print(f"world {world}: {len(plans)} plans, measuring ({reps} interleaved rounds after {warmup} warm-up "
              f"steps each)...", flush=True)
        times = measure(model_name, world, plans, batch, seq, warmup, reps)
        rows = []
        for i, (name, plan) in enumerate(plans):
            is_pick = i == len(plans) - 1
            row = {"world": world, "plan": name, "mesh": str(plan.mesh), "planner_pick": is_pick,
                   "pick_fp32_variant": i == len(plans) - 2,
                   "predicted_s": predict(graph, cluster, plan, batch, seq), "measured_s": median(times[name]),
                   "measured_samples_s": times[name]}
            if is_pick:
                row["same_strategies_as"] = keys.get(_strategy_key(plan))
                row["precision"] = sorted({f"{c}={d}" for p in plan.ops.values() for c, d in p.precision.items()})
            rows.append(row)
        per_world[world] = {**summarize(rows), **pick_verdict(rows)}
        all_rows += rows
    pooled = summarize(all_rows)
    out = {"model": model_name, "cluster": cluster_name, "global_batch": batch, "seq": seq, "warmup": warmup,
           "reps": reps, "quick": quick, "wall_s": time.perf_counter() - t0, "rows": all_rows,
           "per_world": per_world, "pooled": pooled}
    report(out)
    if write:
        print(f"wrote {rel(write_json('fidelity', out))}")
    return out


def report(out: dict) -> None:
    rows = []
    for r in out["rows"]:
        order = sorted((x for x in out["rows"] if x["world"] == r["world"]), key=lambda x: x["measured_s"])
        rows.append([r["world"], r["plan"][:58], f"{r['predicted_s'] * 1e3:.1f}", f"{r['measured_s'] * 1e3:.1f}",
                     f"{r['predicted_s'] / r['measured_s']:.2f}", 1 + order.index(r)])
    print_table(["W", "plan", "predicted ms", "measured ms", "pred/meas", "meas rank"], rows, align="rlrrrr",
                title=f"\ncost-model fidelity: {out['model']}, batch {out['global_batch']} x seq {out['seq']}, "
                      f"cluster {out['cluster']}")
    summ = []
    for w, s in out["per_world"].items():
        summ.append([w, s["plans"], f"{s['spearman']:.3f}", f"{100 * s['median_rel_error']:.1f}%",
                     f"{s['pick_measured_rank']}/{s['of']}", "yes" if s["pick_is_measured_fastest"] else "no",
                     s["pick_same_as"] or "-", f"{s['pick_slowdown_vs_fastest']:.2f}x"])
    p = out["pooled"]
    summ.append(["all", p["plans"], f"{p['spearman']:.3f}", f"{100 * p['median_rel_error']:.1f}%", "", "", "", ""])
    print_table(["W", "candidates", "Spearman", "median rel err", "pick rank", "pick fastest?", "pick = candidate",
                 "pick / fastest"], summ, align="rrrrrlll")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="world size 2 only, 3 rounds")
    ap.add_argument("--calibrate", action="store_true",
                    help="re-run meshplan calibrate first (written to benchmarks/results/local_calibrated.yaml)")
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args(argv)
    worlds = (2,) if a.quick else (2, 4)
    reps = a.reps or (3 if a.quick else 7)
    run(a.model, worlds, a.batch, a.seq, a.warmup, reps, calibrate=a.calibrate, quick=a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
