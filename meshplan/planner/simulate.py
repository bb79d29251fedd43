"""At-scale simulation: the planner's plan and the baselines on G GPUs, priced by one model (problem.evaluate):
step time (pipeline bubbles and exposed communication included), tokens/s, MFU and memory per GPU."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph
from ..table import format_table
from . import breakdown
from .baselines import baseline
from .cluster import Cluster
from .mesh_search import PlannerError, search
from .plans import bubble, model_flops
from .pricing import MeshConfig, Options
from .problem import Breakdown

INTERLEAVE = 4  # Megatron's virtual stages per rank in the interleaved row (the published runs' VP)


@dataclass
class Row:
    name: str
    mesh: MeshConfig
    breakdown: Breakdown
    tokens_per_s: float
    mfu: float
    fits: bool
    note: str = ""
    parts: dict | None = None  # breakdown.split: where the step time goes

    def to_dict(self) -> dict:
        m = self.mesh
        return {"plan": self.name, "pp": m.pp, "dp": m.d, "mp": m.n, "micro_batch": m.b, "microbatches": m.m,
                "step_time_s": self.breakdown.step, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "memory_gb": max(self.breakdown.memory) / 1e9, "bubble": bubble(m), "virtual_stages": m.vp,
                "recompute": m.recompute, "recompute_granularity": m.granularity, "moe_folding": m.fold,
                "error": self.breakdown.error, "fits": self.fits, "note": self.note}


def _row(name: str, graph: Graph, cluster: Cluster, r, global_batch: int, seq: int, limit: float,
         note: str = "") -> Row:
    """r: a mesh_search.Result or plans.Priced (mesh, problem, assignment, breakdown, cost_model)."""
    mc, bd = r.mesh, r.breakdown
    tokens = global_batch * seq
    mfu = model_flops(graph, global_batch, seq) / (mc.gpus * cluster.peak_flops * bd.step)
    parts = breakdown.split(r.cost_model, mc, r.problem, r.assignment, bd)
    return Row(name, mc, bd, tokens / bd.step, mfu, max(bd.memory) <= limit * (1 + 1e-9), note, parts)


def simulate(graph: Graph, cluster: Cluster, gpus: int, global_batch: int, options: Options | None = None,
             reference_pp: int | None = 15, baseline_recompute: dict[str, str] | None = None) -> list[Row]:
    """Rows for: the planner, Megatron at its best pipeline depth, Megatron at docs/reference.md's PP=15
    ("Hardware") (when that divides the model and GPUs), and at PP=15 with Megatron's interleaved schedule (4
    virtual stages per rank, priced only: meshplan's runtime does not run them; where the layers divide into 60
    chunks), MegaScale-style at PP=15, and all-EP/DP. A baseline that cannot run at all is
    reported, not raised. `baseline_recompute`: per baseline kind, its activation-recompute setting, fixed by its
    user across scales (fixed_recompute, baselines.baseline); a kind not in it: whichever fits fastest here."""
    options = options or Options()
    limit = options.mem_limit if options.mem_limit is not None else cluster.memory_limit
    rows = []
    try:
        r = search(graph, cluster, gpus, global_batch, options)
        rows.append(_row("planner", graph, cluster, r, global_batch, options.seq, limit,
                         f"{r.solved} ILPs / {r.searched} meshes"))
    except PlannerError as e:  # report it and still price the baselines (they may use uneven pipeline stages)
        rows.append(_infeasible("planner", e))
    variants = [("megatron", None, "best pp", 1)]
    if reference_pp:
        variants.append(("megatron", reference_pp, f"pp={reference_pp} (docs/reference.md)", 1))
        variants.append(("megatron", reference_pp, f"pp={reference_pp} vp={INTERLEAVE} (interleaved, priced only)",
                         INTERLEAVE))
        variants.append(("megascale", reference_pp, f"pp={reference_pp}, SP+EP, bf16 grads", 1))
    variants.append(("ep_dp", None, "best pp", 1))
    for kind, pp, note, vp in variants:
        try:
            p = baseline(kind, graph, cluster, gpus, global_batch, options, pp=pp,
                         recompute=(baseline_recompute or {}).get(kind), vp=vp)
        except PlannerError as e:
            if pp is None or kind == "megascale":
                rows.append(_infeasible(kind, e))
            continue
        if pp is not None and any(x.name == kind and x.mesh == p.mesh for x in rows):
            continue  # the best depth already is the reference one
        rows.append(_row(kind, graph, cluster, p, global_batch, options.seq, limit, note))
    return rows


BASELINE_DEPTHS = {"megatron": 15, "megascale": 15, "ep_dp": None}


def fixed_recompute(graph: Graph, cluster: Cluster, gpus: int, global_batch: int,
                    options: Options | None = None) -> dict[str, str]:
    """Per baseline kind, the activation-recompute granularity its user picks once for a sweep starting at `gpus`
    (its smallest scale): the least of none -> selective -> full that fits there -- then kept at every larger scale
    (no knife edge where ZeRO-1 state shrinks just below the limit)."""
    out = {}
    for kind, pp in BASELINE_DEPTHS.items():
        try:
            p = baseline(kind, graph, cluster, gpus, global_batch, options or Options(), pp=pp, recompute="none")
            out[kind] = p.mesh.granularity
        except PlannerError:
            out[kind] = "full"
    return out


def _infeasible(name: str, e: Exception) -> Row:
    return Row(name, MeshConfig(1, 1), Breakdown(float("inf"), [0.0], 0.0, [0.0], 0.0, False), 0.0, 0.0, False,
               str(e))


def table(rows: list[Row]) -> str:
    out = []
    for r in rows:
        if r.breakdown.step == float("inf"):
            out.append([r.name, "-", "-", "-", "-", "-", "-", "no", r.note])
            continue
        d = r.to_dict()
        rc = {"full": " +recompute", "selective": " +selective", "none": ""}[r.mesh.granularity]
        rc += f" vp={r.mesh.vp}" if r.mesh.vp > 1 else ""
        out.append([r.name, f"pp={d['pp']} dp={d['dp']} mp={d['mp']} b={d['micro_batch']}x{d['microbatches']}{rc}",
                    f"{d['step_time_s']:.3f}", f"{d['tokens_per_s']:,.0f}", f"{100 * d['mfu']:.1f}%",
                    f"{d['memory_gb']:.1f}", f"{100 * d['bubble']:.1f}%", "yes" if r.fits else "NO", r.note])
    return format_table(["plan", "mesh", "step s", "tokens/s", "MFU", "mem GB/GPU", "bubble", "fits", "note"], out,
                        align="llrrrrrll")
