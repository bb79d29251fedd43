"""Plan settings of Megatron-Core runs, priced so that published runs and Megatron-style baselines are compared as
their users run them (docs/reference.md, "Megatron plan settings"). Selective recompute is a memory setting like
full recompute (the planner searches it); virtual stages and folding are layouts meshplan's runtime does not run:
Plan.validate refuses them for `meshplan run`, while `meshplan simulate` and price_plan price them.

* Selective recompute (`--recompute-granularity selective --recompute-modules layernorm moe_act`): the outputs
  of the norms and of the experts' SwiGLU are not kept; backward reruns them (memory-bound work). An op reading a
  norm's output no longer keeps its copy of it; the MoE drops its w2 input (the SwiGLU output) and rereads the w1
  and w3 outputs it keeps to rebuild it.
* Interleaved 1F1B with v virtual stages per rank (`--num-layers-per-virtual-pipeline-stage`): the bubble is
  (pp - 1) / v stage slots (Narayanan et al. 2021, section 2.2.2), every micro-batch crosses v times as many
  stage boundaries, and rank k holds (2 (pp - k - 1) + (v - 1) pp + 1) model chunks of 1/v of its layers in
  flight (Megatron's interleaved warm-up count): pp + (pp - 1)/v micro-batches' worth on the first stage
  (Korthikanti et al. 2022, section 4.2.3).
* Megatron-Core as the executor (`MeshConfig.megatron`; docs/reference.md, "Memory"): what it keeps for backward
  where it differs from meshplan's runtime. Its grouped experts (`--moe-grouped-gemm`, TEGroupedMLP) multiply the
  routing probabilities into the SwiGLU output inside the activation (weighted_bias_swiglu), so the combine keeps
  no copy of the experts' outputs (meshplan's runtime weights them after w2 and keeps them: k·t·d elements); with
  FP8 GEMMs Transformer Engine keeps the fc1 and fc2 inputs in FP8 (1 B, not 2). Its full recompute
  (`--recompute-granularity full --recompute-method uniform --recompute-num-layers 1`) keeps each transformer
  layer's input only (meshplan's runtime keeps every op's inputs); ops outside the layers keep what they keep.
* MoE parallel folding (Megatron-Core MoE; Liu et al. 2025, arXiv 2504.14960): the non-MoE ops run on a
  `fold`-wide tensor-parallel sub-axis of the model axis (the other mp / fold ranks join data parallelism); the
  experts are expert-parallel over the whole model axis. Every rank then holds 1/mp of the tokens on both sides,
  and the token dispatcher takes each rank's own tokens: no resharding between the MoE and its neighbours.
"""
from __future__ import annotations

from ..ir import graph as G
from ..ir.graph import Op
from ..ir.placement import Shard
from . import cost_model as cm
from . import memory as mem
from .memory import ACT_BYTES
from .options import DEFAULT_MODULES, MeshConfig

NORM_CONSUMERS = (G.ATTENTION, G.MOE, G.FFN)


def sub_mesh(mc: MeshConfig) -> MeshConfig:
    """The mesh the non-MoE ops of a folded plan run on: mp = fold, the other model-axis ranks data parallel."""
    t = mc.fold
    if mc.n % t or (mc.b * t) % mc.n:
        raise ValueError(f"plan.meta.moe_folding.attention_width: {t} must divide mp={mc.n} and mp / {t} the "
                         f"micro-batch of {mc.b} sequences per replica")
    return MeshConfig(t, mc.d * mc.n // t, mc.pp, mc.b * t // mc.n, mc.m, mc.recompute, mc.selective, mc.vp, 0,
                      mc.megatron, mc.modules)


def inflight(pp: int, k: int, m: int, vp: int) -> float:
    """Micro-batches' worth of activations live on pipeline stage k (1F1B; interleaved when vp > 1)."""
    if vp == 1:
        return min(pp - k, m)
    return min((2 * (pp - k - 1) + (vp - 1) * pp + 1) / vp, m)


def reads_norm(graph: G.Graph, op: Op) -> bool:
    """Whether the op's first input is a norm's output (which selective recompute reruns instead of keeping)."""
    return op.kind in NORM_CONSUMERS and bool(op.inputs) and graph.op(op.inputs[0]).kind == G.NORM


def selective(graph: G.Graph, op: Op, cand: str, n: int, b: int, seq: int,
              modules: tuple[str, ...] = DEFAULT_MODULES) -> tuple[float, float, float]:
    """(activation bytes no longer kept, extra HBM bytes moved to rerun, extra fraction of the op's forward +
    backward compute) per micro-batch under selective recompute of `modules` (Megatron's --recompute-modules), for
    one op under candidate `cand` on a model axis of n ranks."""
    dropped = rerun = frac = 0.0
    if "layernorm" in modules and reads_norm(graph, op):  # its copy of the norm output, as its input placement says
        meta = op.input_metas[0]
        sharded = isinstance(cm.placements(op, cand)[0], Shard)
        dropped += ACT_BYTES * float(graph.evaluate(meta.numel, b, seq)) / (n if sharded else 1)
    if "moe_act" in modules and op.kind == G.MOE:  # the w2 input k·t·f: rebuilt from the kept w1, w3 outputs
        a = op.attrs
        act = ACT_BYTES * a["top_k"] * b * seq * a["ffn_dim"] / (1 if cand == "replicate" else n)
        dropped += act
        rerun += 3 * act  # read 2, write 1
    if "mla_up_proj" in modules and op.kind == G.ATTENTION and op.attrs.get("mla"):
        d, f = mla_up_proj(graph, op, cand, n, b, seq)
        dropped, frac = dropped + d, frac + f
    if "mlp" in modules and op.kind == G.FFN:  # the dense MLP keeps its input only and reruns its forward
        a, t = op.attrs, b * seq
        dropped += ACT_BYTES * 3 * t * a["hidden"] / n  # w1, w3 outputs and w2 input: 1/n per rank (tp or sharded)
        frac += 1 / 3
    return dropped, rerun, frac


def mla_up_proj(graph: G.Graph, op: Op, cand: str, n: int, b: int, seq: int) -> tuple[float, float]:
    """(bytes, compute fraction) of Megatron's `mla_up_proj` recompute on a multi-head latent attention: q, k, v
    from the up-projections are not kept (memory.activation_bytes counts q and k, v at head_dim each) but the
    latents are (q LoRA, kv LoRA + the shared rope key, whole under head-split TP); backward reruns the two
    up-projection GEMMs, the fraction of the op's forward FLOPs they are (models/mla.py, ir/ops.py _mla_flops)."""
    a, t = op.attrs, b * seq
    split, sharded = mem.shape(op, cand)
    per_rank = n if split in ("heads", "sequence", "batch") else 1
    qr = a["q_lora_rank"] or 0  # without a q LoRA, q comes from the model dim directly: kept, not rerun
    q = a["n_heads"] * a["head_dim"] if qr else 0
    kv = 2 * a["n_kv_heads"] * a["head_dim"]
    latents = qr + a["kv_lora_rank"] + a["qk_rope_head_dim"]
    kept = ACT_BYTES * latents * (t / n if sharded else t)
    dropped = max(ACT_BYTES * t * (q + kv) / per_rank - kept, 0.0)
    qk, vd = a["qk_nope_head_dim"] + a["qk_rope_head_dim"], a["v_head_dim"]
    up = 2 * t * a["n_heads"] * (qr * qk + a["kv_lora_rank"] * (a["qk_nope_head_dim"] + vd))
    total = float(graph.evaluate(op.flops, b, seq))
    return dropped, (up / total / 3 if total else 0.0)


def megatron_experts(op: Op, cand: str, n: int, b: int, seq: int, fp8: bool, selective: bool) -> float:
    """Activation bytes per micro-batch that Megatron-Core's grouped experts do not keep and meshplan's MoE terms
    (memory.activation_bytes) count: the combine's copy of the expert outputs (k·t·d BF16), and under FP8 GEMMs
    one byte per element of the fc1 input (k·t·d) and of the fc2 input (k·t·f, unless selective recompute already
    dropped it)."""
    if op.kind != G.MOE:
        return 0.0
    a = op.attrs
    rows = a["top_k"] * b * seq / (1 if cand == "replicate" else n)  # routed copies on this rank
    saved = ACT_BYTES * rows * a["dim"]
    if fp8:
        saved += rows * (a["dim"] + (0 if selective else a["ffn_dim"]))
    return saved


def meta_settings(meta: dict) -> dict:
    """MeshConfig fields (selective, vp, fold, megatron) from a plan's meta; recompute (full) is read by
    plans.mesh_config."""
    pipe = meta.get("pipeline") or {}
    fold = meta.get("moe_folding") or {}
    return {"selective": meta.get("activation_recompute") == "selective",
            "vp": int(pipe.get("virtual_stages", 1)), "fold": int(fold.get("attention_width", 0)),
            "megatron": meta.get("executor") == "megatron-core",
            "modules": tuple(meta.get("recompute_modules", DEFAULT_MODULES))}


def write_meta(meta: dict, mc: MeshConfig) -> dict:
    """Record mc's recompute granularity, virtual stages, folding and executor in a plan's meta (what
    meta_settings reads)."""
    meta["activation_recompute"] = mc.granularity
    if mc.vp > 1:
        meta.setdefault("pipeline", {})["virtual_stages"] = mc.vp
    if mc.fold:
        meta["moe_folding"] = {"attention_width": mc.fold}
    if mc.megatron:
        meta["executor"] = "megatron-core"
    if mc.selective and mc.modules != DEFAULT_MODULES:
        meta["recompute_modules"] = list(mc.modules)
    return meta
