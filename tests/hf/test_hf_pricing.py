"""The planner prices an HF model's parameters as the runtime lays them out: fused experts under MoE tp keep
gate_up (and the router) whole, MLA under tp splits the heads' projections and keeps the latents whole."""
import pytest

pytest.importorskip("transformers")

import sympy  # noqa: E402
from hf_models import hf_model  # noqa: E402

from meshplan.hf import adapt  # noqa: E402
from meshplan.ir import trace  # noqa: E402
from meshplan.planner.memory import N, param_split  # noqa: E402


def _ops(family):
    return {op.name: op for op in trace(adapt(hf_model(family))).ops()}


def _total(split, rep, n):
    return int(sympy.sympify(split).subs(N, n)) + int(sympy.sympify(rep).subs(N, n))


def test_fused_experts_under_tp_are_priced_whole():
    op = _ops("mixtral")["layers.0.feed_forward"]
    e, d, f = op.attrs["n_experts"], op.attrs["dim"], op.attrs["ffn_dim"]
    split, rep = param_split(op, "tp")
    assert int(sympy.sympify(rep)) == 2 * e * d * f + d * e  # w13 and the router whole on every rank
    assert _total(split, rep, 2) == op.params - e * d * f // 2  # only w2 halves
    assert _total(*param_split(op, "ep"), 2) == op.params - 3 * e * d * f // 2


def test_mla_under_tp_counts_every_parameter_once():
    op = _ops("deepseek_v3")["layers.0.attention"]
    split, rep = param_split(op, "tp")
    norms = op.attrs["kv_lora_rank"]  # kv_norm's weight
    assert _total(split, rep, 1) == op.params
    assert int(sympy.sympify(rep)) > norms and _total(split, rep, 2) < op.params


def test_mla_up_proj_recompute_drops_q_k_v_keeps_the_latents_and_reruns_the_up_projections():
    # Megatron's --recompute-modules mla_up_proj (DeepSeek-V3's recipe; planner/plan_settings.py)
    from meshplan.ir import graph as G
    from meshplan.planner.memory import activation_bytes
    from meshplan.planner.plan_settings import selective

    b, seq, n = 2, 16, 2
    fracs = {}
    for q_lora in (None, 12):  # without a q LoRA only k, v come from an up-projection
        graph = trace(adapt(hf_model("deepseek_v3", q_lora_rank=q_lora)))
        op = next(o for o in graph.ops() if o.name == "layers.0.attention")
        a = op.attrs
        dropped, rerun, frac = selective(graph, op, "tp", n, b, seq, ("mla_up_proj",))
        q = a["n_heads"] * a["head_dim"] if q_lora else 0
        kv = 2 * a["n_kv_heads"] * a["head_dim"]
        latents = (q_lora or 0) + a["kv_lora_rank"] + a["qk_rope_head_dim"]
        assert dropped == 2 * b * seq * ((q + kv) / n - latents) > 0  # whole latents on each of the n TP ranks
        kept = float(sympy.sympify(activation_bytes(op, "tp")).subs({N: n, G.B: b, G.S: seq}))
        assert dropped < kept and rerun == 0
        assert 0 < frac < 1 / 3  # the up-projection GEMMs, a part of the op's forward
        assert selective(graph, op, "tp", n, b, seq, ("layernorm", "moe_act"))[0] == selective(
            graph, op, "tp", n, b, seq, ("layernorm",))[0]  # moe_act leaves attention alone
        fracs[q_lora] = frac
    assert fracs[12] > fracs[None]  # q's up-projection reruns too


def test_recompute_modules_are_checked_and_survive_the_plan_file():
    import pytest

    from meshplan.ir import Plan
    from meshplan.planner import MeshConfig
    from meshplan.planner.baselines import folded_plan
    from meshplan.planner.plans import mesh_config

    with pytest.raises(ValueError, match=r"^plan\.meta\.recompute_modules: 'core_attn' is not one of"):
        MeshConfig(2, 1, selective=True, modules=("core_attn",))
    graph = trace(adapt(hf_model("deepseek_v3")))
    mc = MeshConfig(2, 1, 1, 2, 2, selective=True, fold=2, megatron=True, modules=("mla_up_proj", "mlp"))
    plan = Plan.from_yaml(folded_plan(graph, mc).to_yaml())
    assert plan.meta["recompute_modules"] == ["mla_up_proj", "mlp"]
    assert mesh_config(plan, 4) == mc
