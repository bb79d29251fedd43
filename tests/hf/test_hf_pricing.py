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
