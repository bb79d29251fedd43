"""Where a plan's step time goes (`meshplan simulate --breakdown`): on the slowest pipeline stage, per layer and
per micro-batch, compute by kind (GEMM, attention, memory-bound, kernel launches), exposed communication by
collective, point-to-point sends; per step, the pipeline bubble, exposed gradient sync and parameter gather, and
the optimizer. The parts add up to problem.evaluate's step time (the same model, split)."""
from __future__ import annotations

from ..table import format_table
from .pricing import RECOMPUTE, CostModel, MeshConfig, layers_per_stage
from .problem import Assignment, Breakdown, Problem, stage_tail

MS = 1e3
KINDS = ("gemm", "attention", "memory", "launch")


def split(cmodel: CostModel, mc: MeshConfig, problem: Problem, a: Assignment, bd: Breakdown) -> dict:
    """{"per_microbatch": {part: s}, "per_step": {part: s}, "layers": layers on the slowest stage, "step": s}."""
    k = max(range(len(bd.stage_times)), key=lambda i: bd.stage_times[i])
    st, costs = problem.stages[k], bd.groups[k]
    redo = RECOMPUTE[0] if mc.recompute else 1.0
    mb = {kind: 0.0 for kind in KINDS}
    for g, c in st.groups.items():
        gm = cmodel.group_mesh(g, mc)  # the sub-mesh of a folded plan's non-MoE ops
        parts = cmodel.compute_split(g, a.strategy[g], gm.n, gm.b)
        for kind in KINDS:
            mb[kind] += c * parts[kind] * redo
        if mc.granularity == "selective":  # the recompute modules rerun (plan_settings)
            base = sum(parts.values())
            rerun = cmodel.selective(g, a.strategy[g], gm, base, 0.0)[0] - base
            mb["selective rerun"] = mb.get("selective rerun", 0.0) + c * rerun
        gc = costs[g]
        if gc.comm > 0:  # the exposed time, shared among the group's collectives by their times
            for name, t in gc.by_coll.items():
                key = f"exposed {name}"
                mb[key] = mb.get(key, 0.0) + gc.exposed * t / gc.comm
    mb["p2p"] = bd.stage_times[k] - sum(mb.values())  # pipeline sends: what the stage time has beyond the above
    m = problem.microbatches
    grad, gather, opt = _tail(problem, a, bd)
    step = {"microbatches (m x stage)": m * bd.stage_times[k], "bubble": problem.bubble_slots * bd.stage_times[k],
            "grad sync (exposed)": grad, "param gather (exposed)": gather, "optimizer": opt}
    layers = max(1, layers_per_stage(cmodel.graph.n_layers(), mc.pp)[st.index])
    return {"stage": st.index, "layers": layers, "per_microbatch": mb, "per_step": step, "step": bd.step}


def _tail(problem: Problem, a: Assignment, bd: Breakdown) -> tuple[float, float, float]:
    """(exposed grad sync, exposed param gather, optimizer) of the stage with the largest per-step tail."""
    best = (0.0, 0.0, 0.0)
    for k, st in enumerate(problem.stages):
        x = stage_tail(problem, a, st, sum(gc.compute for gc in bd.groups[k].values()))
        if sum(x) > sum(best):
            best = x
    return best


def table(name: str, parts: dict) -> str:
    """Rows: each part per layer per micro-batch (ms), per micro-batch on the stage (ms), and per step (s, %)."""
    layers, step = parts["layers"], parts["step"]
    rows = []
    for key, t in parts["per_microbatch"].items():
        if abs(t) < 1e-9:
            continue
        rows.append([key, f"{t / layers * MS:.3f}", f"{t * MS:.2f}", "", ""])
    for key, t in parts["per_step"].items():
        rows.append([key, "", "", f"{t:.3f}", f"{100 * t / step:.1f}%"])
    head = [f"{name}: stage {parts['stage']} ({layers} layers)", "ms/layer/mb", "ms/mb", "s/step", "share"]
    return format_table(head, rows, align="lrrrr")
