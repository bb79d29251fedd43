"""Overlap as a per-collective property of the schedule that runs a plan (docs/reference.md, "Overlap").

A collective hides only behind compute that really runs beside it, and only as long as that compute lasts: every
rule below is hidden = min(what the schedule lets overlap, the duration of the compute it overlaps), never a
constant fraction. `Overlap` says which overlaps the executing system does; a plan records its system's flags in
plan.meta (Megatron's names: tp_comm_overlap, moe_a2a_overlap, overlap_grad_reduce, overlap_param_gather,
overlap_chunks), which plans.price_plan reads.

  * chunks (meshplan's codegen, MegaScale-MoE's inter-operator overlap): an op whose strategy has collectives inside
    it (Strategy.chunked, which codegen.emit emits: Ulysses attention, EP MoE) runs in c micro-batch chunks; piece
    i of a collective runs while chunk i+1 computes the phase before it or chunk i-1 the phase after it
    (chunked_hidden). meshplan's
    runtime does this only for uncompressed collectives (ir/strategies.runs_async, codegen.emit.overlapped).
  * moe_a2a_overlap (Megatron-Core's EP A2A overlap; DeepSeek-V3's dual micro-batch overlap): EP's dispatch and
    combine hide behind another micro-batch's compute of the same layer, in the pipeline's steady state only
    (other_batch_hidden).
  * tp_comm_overlap (Transformer Engine userbuffers): a TP all-gather / reduce-scatter hides behind the GEMM it
    feeds / that feeds it, all but its first chunk (tp_hidden).
  * overlap_grad_reduce / overlap_param_gather (Megatron's distributed optimizer; meshplan's codegen issues each
    op's gradient reduction after its backward): the gradient sync hides behind the last micro-batch's backward, the
    parameter all-gather behind the first micro-batch's forward, except the one chunk that nothing follows
    (Problem.dp_chunks, problem.stage_tail).
  * Pipeline point-to-point sends are priced exposed in every system.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..ir.strategies import CHUNKS, PRECISIONS, runs_async, strategy_of
from . import cost_model as cm_

META_KEYS = {"overlap_chunks": "chunks", "moe_a2a_overlap": "a2a", "tp_comm_overlap": "tp",
             "overlap_grad_reduce": "grad_reduce", "overlap_param_gather": "param_gather",
             "overlap_native_only": "native_only", "overlap_dp_chunk": "dp_chunk"}
DP_CHUNKS = ("layer", "virtual_stage")
TP_KINDS = {"all_gather", "reduce_scatter", "all_reduce", "none", "slice"}  # tensor-parallel communication
# SMs DeepEP's dispatch/combine kernels occupy while they run beside compute (DeepSeek-V3 report, section 3.2.2:
# 20 of an H800's 132 SMs): the compute they overlap runs on the rest (docs/reference.md, "Overlap")
DEEPEP_SMS = 20


@dataclass(frozen=True)
class Overlap:
    chunks: int = CHUNKS  # micro-batch chunks of ops with internal collectives (<= 1: none)
    native_only: bool = True  # chunked overlap only for uncompressed ("fp32") collectives (meshplan's runtime)
    a2a: bool = False  # EP all-to-alls behind another micro-batch's compute (moe_a2a_overlap / dual-batch)
    tp: bool = False  # TP all-gather / reduce-scatter behind their GEMMs (tp_comm_overlap)
    grad_reduce: bool = True  # gradient reduction behind the backward
    param_gather: bool = False  # distributed optimizer's parameter all-gather behind the next forward
    dp_chunk: str = "layer"  # what one gradient / parameter chunk is: "layer" (per op) or "virtual_stage"

    def with_meta(self, meta: dict) -> "Overlap":
        """These flags with a plan's meta overriding the ones it states (META_KEYS)."""
        over = {field: (int(meta[k]) if field == "chunks" else meta[k] if field == "dp_chunk" else bool(meta[k]))
                for k, field in META_KEYS.items() if k in meta}
        if over.get("dp_chunk", self.dp_chunk) not in DP_CHUNKS:
            raise ValueError(f"plan.meta.overlap_dp_chunk: {over['dp_chunk']!r} is not one of {', '.join(DP_CHUNKS)}")
        return replace(self, **over)

    def to_meta(self) -> dict:
        return {k: getattr(self, field) for k, field in META_KEYS.items()}


# meshplan's own plans: codegen's 2-chunk schedule for sp/ep ops (native wire format only), each op's gradient
# reduction after its backward (codegen.task_graph), no TP or parameter-gather overlap (the executor's reshardings
# and runtime/zero.py's gather are synchronous)
MESHPLAN = Overlap()
# Megatron-LM / Megatron-Bridge with the distributed optimizer's overlap flags on: DP reduce-scatter and all-gather
# in buckets (>= 40M parameters: about a layer or less here) as their layers' gradients / first use come; TP and EP
# overlap only where a recipe sets them
MEGATRON = Overlap(chunks=0, native_only=False, grad_reduce=True, param_gather=True, dp_chunk="layer")
# MegaScale-MoE: inter-operator chunked overlap (what meshplan's codegen copies) in any wire format, TP overlapped
# inside its operators, DP communication as Megatron's
MEGASCALE = replace(MEGATRON, chunks=CHUNKS, tp=True, dp_chunk="layer")


def chunked_hidden(comm: float, before: float, after: float, chunks: int) -> float:
    """Seconds of one collective (comm, one direction, whole micro-batch) that a c-chunk schedule hides: piece 0
    runs beside the next chunk's `before` phase (the compute it waits for), the last piece beside the previous
    chunk's `after` phase (the compute waiting for it), middle pieces beside both."""
    if chunks <= 1:
        return 0.0
    piece = comm / chunks
    edge = min(piece, before / chunks) + min(piece, after / chunks)
    return edge + (chunks - 2) * min(piece, (before + after) / chunks)


def tp_hidden(comm: float, gemm: float, n: int) -> float:
    """A TP all-gather / reduce-scatter split in n chunks beside the GEMM it feeds: all chunks but the first."""
    return min(comm * (1 - 1 / n), gemm) if n > 1 else 0.0


def other_batch_hidden(comm: float, other: float, steady: float) -> float:
    """EP all-to-alls behind another micro-batch's compute of the layer (`other`, seconds), in the `steady`
    fraction of micro-batches that have a partner (the pipeline's warm-up and cool-down run alone)."""
    return steady * min(comm, other)


def steady_fraction(pp: int, m: int, vp: int) -> float:
    """Share of a stage's micro-batch chunks that run beside another one's (forward beside backward): all but the
    first rank's warm-up chunks (Megatron's interleaved schedule: 2(p - 1) + (v - 1)p; 1F1B: p - 1; one pipeline
    stage: the first micro-batch)."""
    warm = (2 * (pp - 1) + (vp - 1) * pp) if vp > 1 else max(pp - 1, 1)
    return max(0.0, 1 - warm / (m * vp))


def work_seconds(work, peak: float, hbm: float, act_bytes: float = 2.0) -> float:
    """A roofline weight of (FLOPs, elements moved): the share of an op's compute time a phase takes is its weight
    over the weight of all the op's compute phases."""
    flops, elems = work
    return flops / peak + elems * act_bytes / hbm


def own_floors(times: dict[str, float], kind: str, emitted: bool, before: float, after: float, compute: float,
               n: int, ov: Overlap, tp_kinds) -> dict[str, float]:  # emitted: the strategy is `chunked`
    """Exposed seconds per wire precision of one op-internal collective priced `times` (forward + backward, per
    micro-batch). before / after: seconds (forward + backward) of the compute phases it waits for / that wait for it
    (0 where the strategy has no such phases); compute: the op's whole compute."""
    out = {}
    for dt, t in times.items():
        hidden = 0.0
        if emitted and ov.chunks > 1 and (runs_async(dt) or not ov.native_only):
            # each direction is half the time; forward compute 1/3 of forward + backward, backward 2/3, and the
            # backward's mirror collective waits for the `after` phase's backward and feeds the `before` one's
            hidden = (chunked_hidden(t / 2, before / 3, after / 3, ov.chunks)
                      + chunked_hidden(t / 2, 2 * after / 3, 2 * before / 3, ov.chunks))
        elif kind in tp_kinds and ov.tp:
            hidden = tp_hidden(t, compute / 2, n)
        out[dt] = t - hidden
    return out


def edge_floors(cost: dict, tp_like: bool, src_compute: float, dst_compute: float, gathers: bool, n: int,
                ov: Overlap) -> dict[str, float]:
    """Exposed seconds per precision of one resharding (forward + backward): TP's all-gather hides behind the GEMM
    it feeds (the consumer's first half), its reduce-scatter behind the producer's last half, with tp_comm_overlap;
    every other resharding (the executor's synchronous all-to-alls) is exposed."""
    if not (tp_like and ov.tp):
        return dict(cost)
    gemm = (dst_compute if gathers else src_compute) / 2
    return {dt: t - tp_hidden(t, gemm, n) for dt, t in cost.items()}


def other_batch(cm, groups: dict, mc) -> None:
    """moe_a2a_overlap (overlap.other_batch_hidden): each MoE's routed all-to-alls hide behind another
    micro-batch's compute of its layer in the pipeline's steady state, shared over them by their exposed
    times; with DeepEP, the compute beside them loses DEEPEP_SMS SMs. The layer's compute takes each op's
    cheapest candidate (a plan has one)."""
    steady = steady_fraction(mc.pp, mc.m, mc.vp)
    k = cm.cluster.kernels
    stretch = DEEPEP_SMS / (k.sm_count - DEEPEP_SMS) if cm.opt.ep_dispatch == "deepep" and k else 0.0
    layer: dict[int, float] = {}
    for op in cm.ops:
        if op.layer is not None:
            grp = groups[cm.group_of[op.name]]
            layer[op.layer] = layer.get(op.layer, 0.0) + min(ch.compute for ch in grp.choices.values())
    for g, grp in groups.items():
        rep = cm.groups[g].ops[0]
        if rep.layer is None:
            continue
        for cand, ch in grp.choices.items():
            names = [c.name for c in cm.groups[g].terms[cand].colls if c.routed]
            for dt in ch.floors[names[0]] if names else ():
                total = sum(ch.floors[name][dt] for name in names)
                if total > 0:
                    hidden = other_batch_hidden(total, layer[rep.layer], steady)
                    keep = 1 - hidden * (1 - stretch) / total  # the overlapped compute slowed by the SMs taken
                    for name in names:
                        ch.floors[name][dt] *= keep


def chunked_strategy(kind: str, cand: str) -> bool:
    """Whether codegen runs this (kind, strategy) in interleaved chunks (Strategy.chunked)."""
    strat = strategy_of(kind, cand)
    return strat is not None and strat.chunked


def collective_floors(cm, kind: str, cand: str, coll, times: dict, work: list, compute: float, n: int) -> dict:
    """Exposed seconds per precision of one own collective of a CostModel's op (own_floors): the compute phases
    beside it take their roofline share (work_seconds) of the op's compute."""
    w = [work_seconds(work[i:i + 2], cm.cluster.peak_flops, cm.cluster.hbm_bandwidth) for i in (0, 2, 4)]
    before, after = (compute * w[0] / w[2], compute * w[1] / w[2]) if w[2] > 0 else (0.0, 0.0)
    return own_floors(times, coll.kind, chunked_strategy(kind, cand), before, after, compute, n, cm.opt.overlap,
                      TP_KINDS)


def mark_together(ch, kind: str, cand: str, ov: Overlap) -> None:
    """A chunked op on a native-only schedule: the runtime chunks it only if none of its collectives is compressed
    (Choice.together)."""
    if chunked_strategy(kind, cand) and ov.chunks > 1 and ov.native_only:
        ch.together = tuple(ch.colls)
        ch.async_dtypes = tuple(dt for dt in PRECISIONS if runs_async(dt))


def resharding_floors(cm, key: tuple, cost: dict, src, dst, n: int) -> dict[tuple[str, str], dict[str, float]]:
    """Per communicating (producer, consumer) strategy pair of a CostModel's edge, the exposed seconds of the
    resharding per precision (edge_floors: TP's collectives behind their GEMMs with tp_comm_overlap, else
    exposed)."""
    u, v = cm.edges[key][0]
    out = {}
    for (s, t), times in cost.items():
        kinds = set(cm_.edge_kinds(u, s, v, t))
        out[s, t] = edge_floors(times, kinds <= TP_KINDS, src.choices[s].compute, dst.choices[t].compute,
                                "all_gather" in kinds, n, cm.opt.overlap)
    return out
