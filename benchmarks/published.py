"""Validation against published MoE training runs on DGX-H100: each run's model (configs/models/ or an HF
config.json in configs/hf/), its published parallel settings, priced by the one cost model on cluster h100;
predicted vs published Model TFLOP/s per GPU.

Every run is expressed as Megatron-Core runs it (docs/reference.md#published-runs, planner/plan_settings.py; its
memory as Megatron-Core keeps activations, MeshConfig.megatron: docs/reference.md, "Memory"): the mesh is
(pp, dp, mp) with mp = EP; MoE parallel folding (baselines.folded_plan): the MoE expert-parallel over mp, every
other op on the run's TP-wide sub-axis of mp (Megatron's TP + SP; data parallel at TP1), the token dispatcher
taking each rank's own tokens; micro-batch MBS sequences per GPU; VP virtual pipeline stages (interleaved 1F1B);
activation recompute as the run publishes it (ModelZoo Qwen3: selective of norms + MoE activations; DeepSeek-V3's
recipe: selective of MLA up-projections + dense MLPs; the Bridge Qwen3 recipe: none), else as Megatron-Bridge's
guidance orders it, the first that fits memory: none, selective, full. FP8 runs' GEMMs run on the FP8 peak with
their operands cast in HBM (Options.gemm_dtype; attention stays BF16), gradients reduce-scattered in FP32
(Megatron's default; BF16 where the recipe says so) with the distributed optimizer, EP across nodes dispatched by
DeepEP (once per destination node, Options.ep_dispatch: what Megatron's cross-node EP recipes on H100 use),
routing force-balanced (Megatron-Bridge's benchmarks do). DeepSeek-V3 and Qwen3-235B-A22B are traced from their
HF config.json (configs/hf/: MLA, wide-q GQA, q/k norms as released; DeepSeek-V3's MTP module left out);
GPT-OSS-120B has no HF adapter and stays an approximating YAML (its header says how). Predicted TFLOP/s = the
model's 3x forward FLOPs per step / step time / GPUs.

    python benchmarks/published.py
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, print_table  # noqa: E402

HF = str(Path(__file__).resolve().parents[1] / "meshplan" / "configs" / "hf") + "/"  # HF config.json files
DEEPSEEK_V3, QWEN3 = HF + "deepseek-v3/config.json", HF + "qwen3-235b-a22b/config.json"
BRIDGE = ("Megatron-Bridge performance summary, DGX-H100 table (docs/performance-summary.md, NeMo {v} container; "
          "docs.nvidia.com/nemo/megatron-bridge/latest/performance-summary.html)")

# The H100 FP8 preset's dispatcher and overlap (the container versions' own copy is not public; this is the repo's)
QWEN3_RECIPE = ("; dispatcher and overlap from Megatron-Bridge scripts/performance/configs/qwen/"
                "qwen3_workload_base_configs.py, QWEN3_235B_A22B_PRETRAIN_CONFIG_H100_FP8_CS_V1: TP2 PP8 VP4 EP32, "
                "GBS 2048, moe_token_dispatcher_type alltoall, moe_a2a_overlap True; recompute and gradients from "
                "scripts/performance/configs/qwen3/qwen3_llm_pretrain.py: recompute_granularity None, "
                "grad_reduce_in_fp32 False, tp_comm_overlap True")
# The 25.09 container's H100 Qwen3 row is marked "tokendrop" (the 25.11 one dropless, force-balanced); the recipe of
# that layout applies token drop and sets no moe_a2a_overlap
QWEN3_RECIPE_2509 = ("; settings from the 25.09-era Megatron-Bridge scripts/performance/configs/qwen3/"
                     "qwen3_235b_a22b_llm_pretrain.py, qwen3_235b_a22b_h100_fp8_config: TP2 PP8 VP4 EP32, GBS 2048, "
                     "CommOverlapConfig(tp_comm_overlap=True), apply_moe_token_drop (capacity factor 1.0, expert "
                     "inputs padded to capacity), recompute None, grad_reduce_in_fp32 False, no moe_a2a_overlap")
DEEPSEEK_RECIPE = ("; recipe: Megatron-Bridge scripts/performance/configs/deepseek/deepseek_llm_pretrain.py, "
                   "deepseek_v3_h100_1024gpus_fp8_config: enable_deepep, set_moe_a2a_overlap_overrides, "
                   "recompute_granularity selective (mla_up_proj, mlp), grad_reduce_in_fp32 False, layout "
                   "Et|(tt|)*30mL")


@dataclass(frozen=True)
class Run:
    name: str
    model: str
    source: str
    published: float  # Model TFLOP/s per GPU
    gpus: int
    gbs: int
    mbs: int
    seq: int
    pp: int
    ep: int
    precision: str
    overlap: dict  # the run's overlap flags beyond Megatron's DP overlap (planner/overlap.py: plan.meta names)
    settings: str
    ep_dispatch: str = "all_to_all"  # "deepep" where EP spans nodes (Options.ep_dispatch)
    tp: int = 1  # attention's tensor-parallel width (MoE parallel folding: a sub-axis of EP)
    vp: int = 1  # virtual pipeline stages per rank
    recompute: tuple[str, ...] = ("none", "selective", "full")  # granularities tried, the first that fits
    grad: str = "fp32"  # gradient reduction dtype (Megatron's default fp32 unless the recipe says bf16)
    modules: tuple[str, ...] = ("layernorm", "moe_act")  # what selective recompute reruns (--recompute-modules)


RUNS = [
    Run("Mixtral-8x7B BF16, 64 H100", "mixtral-8x7b",
        "Megatron-Core MoE README (megatron/core/transformer/moe/README.md, MCore v0.9): 468 TFLOPS/GPU; settings "
        "TP1 PP4 EP8 from its Mixtral example (assumed 64 GPUs, GBS 256, seq 4096)", 468.0, 64, 256, 1, 4096, 4, 8,
        "bf16", {}, "TP1 PP4 EP8"),
    Run("DeepSeek-V3 FP8, 1024 H100", DEEPSEEK_V3, BRIDGE.format(v="25.09") + DEEPSEEK_RECIPE, 338.0, 1024, 8192,
        1, 4096, 8, 64, "fp8", {"moe_a2a_overlap": True}, "TP2 PP8 VP4 EP64, GBS 8192, MBS 1 (the recipe's DeepEP, "
        "moe a2a overlap, selective recompute of mla_up_proj and mlp, BF16 gradient reduction)", "deepep", tp=2, vp=4,
        recompute=("selective",), grad="bf16", modules=("mla_up_proj", "mlp")),
    Run("Qwen3-235B-A22B FP8, 256 H100 (25.09)", QWEN3, BRIDGE.format(v="25.09") + QWEN3_RECIPE_2509, 178.0,
        256, 2048, 1, 4096, 8, 32, "fp8", {"tp_comm_overlap": True}, "TP2 PP8 VP4 EP32, GBS 2048, MBS 1 (the "
        "25.09 recipe: token drop at capacity 1.0 padded, no moe a2a overlap, TP overlap, no recompute, BF16 "
        "gradient reduction)", tp=2, vp=4, recompute=("none",), grad="bf16"),
    Run("Qwen3-235B-A22B FP8, 256 H100 (25.11)", QWEN3, BRIDGE.format(v="25.11") + QWEN3_RECIPE, 233.0,
        256, 2048, 1, 4096, 8, 32, "fp8", {"moe_a2a_overlap": True, "tp_comm_overlap": True},
        "TP2 PP8 VP4 EP32, GBS 2048, MBS 1 (the recipe's all-to-all dispatcher, moe a2a overlap, TP overlap, no "
        "recompute, BF16 gradients)", tp=2, vp=4,
        recompute=("none",), grad="bf16"),
    Run("Qwen3-235B-A22B BF16, 256 H100 (ModelZoo)", QWEN3,
        "Megatron-MoE-ModelZoo best_practice/Qwen3/readme.md (yanring/Megatron-MoE-ModelZoo), cross-node EP, DeepEP, "
        "no 1F1B overlap: 245 TFLOPS/GPU", 245.0, 256, 2048, 1, 4096, 8, 32, "bf16", {},
        "TP2 PP8 VP4 EP32, GBS 2048, MBS 1, recompute norm+act", "deepep", tp=2, vp=4, recompute=("selective",)),
    Run("GPT-OSS-120B BF16, 64 H100", "gpt-oss-120b", BRIDGE.format(v="25.11") + "; gradients: Megatron-Bridge "
        "scripts/performance/configs/gpt_oss/gpt_oss_llm_pretrain.py set_gpt_oss_common_configs, grad_reduce_in_fp32 "
        "False", 153.0, 64, 512, 4, 4096, 4, 8, "bf16", {}, "TP1 PP4 EP8, GBS 512, MBS 4 (BF16 gradient reduction)",
        grad="bf16"),
]


def predict(run: Run, cluster) -> dict:
    from meshplan.ir.plan import PlanError
    from meshplan.loading import load_graph
    from meshplan.planner import MeshConfig, Options
    from meshplan.planner.baselines import folded_plan
    from meshplan.planner.plans import fits, model_flops, price_plan

    graph = load_graph(run.model)[0]
    n, b = run.ep, run.ep // run.tp * run.mbs  # MBS sequences per attention TP group, mp / TP groups per EP group
    d = run.gpus // (run.pp * n)
    m = run.gbs // (d * b)
    opts = Options(seq=run.seq, balanced_routing=True, gemm_dtype=run.precision,
                   ep_dispatch=run.ep_dispatch)
    priced = None
    for granularity in run.recompute:  # the first granularity that fits memory
        mc = MeshConfig(n, d, run.pp, b, m, granularity == "full", granularity == "selective", run.vp, run.tp,
                        megatron=True, modules=run.modules)
        plan = folded_plan(graph, mc)  # Megatron's overlap flags (overlap.MEGATRON), then the run's own
        plan.meta.update(run.overlap)
        for p in plan.ops.values():
            if "grad" in p.precision:
                p.precision["grad"] = run.grad
        try:
            priced = price_plan(graph, cluster, plan, run.gbs, opts)
        except PlanError as e:
            return {"error": str(e)}
        if fits(priced):
            break
    tflops = model_flops(graph, run.gbs, run.seq) / priced.breakdown.step / run.gpus / 1e12
    return {"predicted_tflops_per_gpu": tflops, "mesh": str(priced.mesh), "step_s": priced.breakdown.step,
            "memory_gb": max(priced.breakdown.memory) / 1e9, "fits": fits(priced),
            "recompute": priced.mesh.granularity}


def main() -> int:
    import json

    from meshplan.planner.cluster import load_cluster

    cluster, start, out, rows = load_cluster("h100"), time.time(), [], []
    for run in RUNS:
        r = predict(run, cluster)
        pred = r.get("predicted_tflops_per_gpu", float("nan"))
        err = pred / run.published - 1
        out.append({"name": run.name, "source": run.source, "published_tflops_per_gpu": run.published,
                    "predicted_tflops_per_gpu": round(pred, 1), "relative_error": round(err, 3),
                    "within_25pct": abs(err) <= 0.25, "settings": run.settings, "precision": run.precision,
                    **{k: v for k, v in r.items() if k != "predicted_tflops_per_gpu"}})
        rows.append([run.name, run.settings.split(",")[0], f"{run.published:.0f}", f"{pred:.0f}", f"{100 * err:+.0f}%",
                     "yes" if abs(err) <= 0.25 else "MISS", r.get("mesh", r.get("error", ""))])
    print_table(["run", "published settings", "published TFLOP/s", "predicted", "error", "within 25%", "priced as"],
                rows, align="llrrrll", title=f"cluster h100 ({time.time() - start:.0f} s)")
    (RESULTS / "published.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
