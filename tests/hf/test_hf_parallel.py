"""HF models under forced and planned strategies on in-process thread worlds: loss and every gradient (by HF
name) equal to HF's own model on one process (fp32: |dloss| < 1e-5, gradients within 1e-4 of their scale)."""
import pytest

pytest.importorskip("transformers")

from hf_harness import auto_plan, forced_plan, run_threads  # noqa: E402
from hf_models import FAMILIES  # noqa: E402

from meshplan.ir import Mesh, Plan  # noqa: E402

MOE = ("ep", "tp", "ag_scatter")
CASES = [("llama", {"attention": a, "ffn": "tp"}) for a in ("sp", "tp")]
CASES += [(f, {"attention": a, "moe": m}) for f in FAMILIES if f != "llama" for a in ("sp", "tp") for m in MOE
          if not (f == "olmoe" and a == "tp")]


@pytest.mark.parametrize("family, strategies", CASES, ids=[f"{f}-{s.get('attention')}-{s.get('moe', s.get('ffn'))}"
                                                           for f, s in CASES])
def test_forced_strategies_equal_hf(family, strategies):
    graph, plan = forced_plan(family, strategies)
    assert run_threads(family, graph, plan) == []


# What the planner picks for these tiny models: replicated (h100, small batch: latency-bound), data parallel
# (a CPU cluster, a large batch), and sp attention + sequence-sharded MoE/FFN (the same on a fixed mp=2 mesh).
PLANNED = {"tiny-h100": dict(cluster="h100"), "dp": dict(cluster="local", shape=(64, 32)),
           "mp2": dict(cluster="local", shape=(64, 32), mesh=Mesh.of(mp=2))}


@pytest.mark.parametrize("setting", PLANNED)
@pytest.mark.parametrize("family", FAMILIES)
def test_planner_auto_plan_equals_hf(family, setting):
    graph, plan = auto_plan(family, world=2, **PLANNED[setting])
    assert plan.mesh.size == 2
    assert run_threads(family, graph, plan) == []


@pytest.mark.parametrize("family, strategies, mesh, over", [
    ("qwen3_moe", {"attention": "tp", "moe": "ep"}, Mesh.of(mp=4), {}),  # 2 KV heads on 4 ranks: shared KV heads
    ("qwen2_moe", {"attention": "tp", "moe": "tp"}, Mesh.of(mp=4), {}),  # ... with their q/k/v biases
    ("qwen2_moe", {"attention": "sp", "moe": "ag_scatter"}, Mesh.of(dp=2, mp=2), {}),
    ("llama", {"attention": "tp", "ffn": "tp"}, Mesh.of(mp=4), {"attention_bias": True}),  # wo's bias added once
])
def test_four_ranks_equal_hf(family, strategies, mesh, over):
    graph, _ = forced_plan(family, strategies, **over)
    assert run_threads(family, graph, Plan.build(graph, mesh, strategies), **over) == []


@pytest.mark.parametrize("family, strategies, over", [
    ("llama", {"attention": "tp", "ffn": "tp"}, {"tie_word_embeddings": True}),
    ("llama", {"attention": "sp", "ffn": "tp", "embedding": "vocab"}, {"attention_bias": True}),
    ("qwen3_moe", {"attention": "sp", "moe": "ep"}, {"head_dim": 16}),  # head_dim != hidden / heads
    ("qwen3_moe", {"attention": "tp", "moe": "tp"}, {"head_dim": 16}),
])
def test_config_variants_equal_hf(family, strategies, over):
    graph, plan = forced_plan(family, strategies, **over)
    assert run_threads(family, graph, plan, **over) == []


def test_a_wrong_variant_is_caught():
    """The comparison is sharp: the interleaved RoPE meshplan's own model uses instead of HF's rotate-half fails."""
    graph, plan = forced_plan("llama", {"attention": "sp", "ffn": "tp"})
    for op in graph.ops():
        if op.kind == "attention":
            op.attrs["rope"] = "interleaved"
    assert any("loss" in m for m in run_threads("llama", graph, plan))


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_emitted_overlap_code_equals_hf(family):
    """codegen's chunked sp/ep code (all-to-alls in flight between chunks) honours the variants too."""
    graph, plan = forced_plan(family, {"attention": "sp", "moe": "ep"})
    assert run_threads(family, graph, plan, overlap_chunks=2) == []


@pytest.mark.parametrize("moe", ["ep", "tp"])
def test_fused_experts_on_triton_kernels(monkeypatch, moe):
    """The grouped-GEMM kernels (the path CUDA runs; here Triton's interpreter) on the fused gate_up views."""
    from meshplan.kernels import triton_available
    from meshplan.runtime import moe_routing

    if not triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("MESHPLAN_KERNELS", "triton")
    calls = []
    real = moe_routing.use_triton
    monkeypatch.setattr(moe_routing, "use_triton", lambda x, op: calls.append(real(x, op)) or calls[-1])
    graph, plan = forced_plan("qwen2_moe", {"attention": "sp", "moe": moe})
    assert run_threads("qwen2_moe", graph, plan) == []
    assert any(calls)
