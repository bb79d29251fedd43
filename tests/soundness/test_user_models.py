"""Users' models — nobody in meshplan wrote them — are exact under every plan meshplan accepts, or refused.

Every run goes through `meshplan.compile(..., verify=True)` on an in-process world: the compiled model's loss and
every gradient must equal the single-device model's (fp32: rel 1e-4, in practice ~1e-7), or verify raises.
"""
import copy
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from harness import planner_plan, random_forced_plan, run_plan, sharded_ops  # noqa: E402
from random_models import build, random_lm_spec  # noqa: E402
from user_models import NAMED, CumsumMixer  # noqa: E402

import meshplan  # noqa: E402
from meshplan.ir import Mesh, Plan, trace  # noqa: E402
from meshplan.ir.plan import PlanError  # noqa: E402
from meshplan.ir.tracer import TraceError  # noqa: E402
from meshplan.runtime import LocalWorld, ParallelModel  # noqa: E402
from meshplan.runtime.implementations import IMPLEMENTATIONS  # noqa: E402
from meshplan.runtime.verify import PlanVerificationError, verify  # noqa: E402

TOKENS = torch.zeros(4, 16, dtype=torch.long)


def _model(name: str):
    torch.manual_seed(0)
    return NAMED[name]()


@pytest.mark.parametrize("name", sorted(NAMED.keys() - {"cumsum_mixer"}))
@pytest.mark.parametrize("cluster,world", [("local", 2), ("h100", 2), ("local", 4), ("h100", 4)])
def test_planner_plan_equals_one_device(name, cluster, world):
    """The planner's own plan for a user's model runs equal to one device (verify raises otherwise).
    Mutation tried: letting `seq` through for sequence-mixing ops (offered_error returning None) makes the
    encoder LM's h100 plans differ (verify names the encoder op)."""
    model = _model(name)
    plan = planner_plan(model, cluster, world, TOKENS)
    for report in run_plan(model, plan, TOKENS, cluster):
        assert report.loss_error < 1e-5 and report.grad_error < 1e-4, report


@pytest.mark.parametrize("name", ["nanogpt_tied", "nanogpt_untied", "encoder_lm", "scaled_mlp"])
@pytest.mark.parametrize("mesh", [Mesh.of(mp=2), Mesh.of(dp=2, mp=2)])
def test_sharded_plans_equal_one_device(name, mesh):
    """Real model-parallel strategies on user models: row-parallel Linears (partial sums resharded before any
    reader: through split/chunk too), vocab-parallel embeddings. Mutation tried: dropping the tracer's edges
    from a tuple's producer to its getitems (consumers with inputs=[]) made nanoGPT's c_attn partial sums
    reach the attention unreduced: loss off by 30%."""
    model = _model(name)
    graph = trace(model, (TOKENS,))
    plan = Plan.build(graph, mesh, {"linear": "tp", "embedding": "vocab"})
    assert sharded_ops(plan), plan.summary()
    for report in run_plan(model, plan, TOKENS):
        assert report.grad_error < 1e-4, report


@pytest.mark.parametrize("name", ["nanogpt_tied", "encoder_lm"])
def test_recomputed_plans_equal_one_device(name):
    """Full activation recomputation (runtime/recompute.py) on user models under row-/vocab-parallel plans:
    every op reruns in backward, its collectives re-issued, and loss and gradients still equal one device."""
    model = _model(name)
    plan = Plan.build(trace(model, (TOKENS,)), Mesh.of(dp=2, mp=2), {"linear": "tp", "embedding": "vocab"})
    plan.meta = {**(plan.meta or {}), "activation_recompute": "full"}
    for report in run_plan(model, plan, TOKENS):
        assert report.loss_error < 1e-5 and report.grad_error < 1e-4, report


def test_sequence_sharding_of_a_mixing_op_is_refused():
    model = _model("encoder_lm")
    graph = trace(model, (TOKENS,))
    forced = {"generic": "seq", "linear": "seq", "norm": "seq", "embedding": "seq"}
    with pytest.raises(PlanError, match=r"plan.ops\['encoder'\].strategy: .*not token-wise.*TransformerEncoder"):
        Plan.build(graph, Mesh.of(mp=2), {**forced, "encoder": "seq"}).validate(graph, batch=4, seq=16)
    broad = Plan.build(graph, Mesh.of(mp=2), forced).validate(graph, batch=4, seq=16)  # a kind entry: said, exact
    assert broad.ops["encoder"].strategy == "replicate"
    assert any(f.startswith("encoder: seq -> replicate") for f in broad.meta["fallbacks"])


def test_cumsum_is_sequence_mixing():
    model = build({"blocks": ["cumsum"], "positions": "none", "tied": False, "norm": "layer"})
    graph = trace(model, (TOKENS,))
    cumsum = next(op for op in graph.ops() if op.attrs.get("target") == "cumsum")
    assert cumsum.batch_wise and not cumsum.token_wise
    plan = Plan.build(graph, Mesh.of(mp=2), {"generic": "seq"})
    assert plan.ops[cumsum.name].strategy == "replicate"  # the default falls back to what is exact
    for report in run_plan(model, plan, TOKENS):
        assert report.grad_error < 1e-4


def test_a_size_turned_into_a_python_number_is_refused_at_trace():
    with pytest.raises(TraceError, match="turns the sequence length into a constant"):
        trace(CumsumMixer(), (TOKENS,))


def test_verify_names_the_first_wrong_op():
    """A wrong implementation of one op (here: a Linear's output scaled by 1.01) is caught and named."""
    model = _model("scaled_mlp")
    graph = trace(model, (TOKENS,))
    plan = Plan.build(graph, Mesh.of(mp=2), {"linear": "tp"}).validate(graph)
    world = LocalWorld(2, timeout_s=30)
    groups = world.groups(plan.mesh)
    models = [copy.deepcopy(model) for _ in range(2)]
    tokens = torch.randint(0, 64, (4, 16))

    def rank(r):
        pm = ParallelModel(models[r], plan, graph, groups=groups[r])
        impl = IMPLEMENTATIONS[("linear", plan.ops["up"].strategy)]
        pm.op_overrides["up"] = lambda ctx, *ins: impl(ctx, *ins) * 1.01
        with pytest.raises(PlanVerificationError, match=r"first differing op: 'up' \(linear, strategy tp"):
            verify(pm, models[r], graph, tokens)
        return True

    assert world.run(rank) == [True, True]


def test_verify_refuses_ranks_built_with_different_weights():
    graph_model = _model("scaled_mlp")
    plan = Plan.build(trace(graph_model, (TOKENS,)), Mesh.of(dp=2), {}, axis=None)
    meshplan.compile(graph_model, cluster="local", plan=plan, world_size=2, example_inputs=(TOKENS,))
    world = LocalWorld(2, timeout_s=30)
    groups = world.groups(plan.mesh)
    models = []
    for seed in (0, 1):  # a user who forgot to seed every rank alike
        torch.manual_seed(seed)
        models.append(NAMED["scaled_mlp"]())

    def rank(r):
        with pytest.raises(PlanVerificationError, match="the ranks' models differ"):
            meshplan.compile(models[r], cluster="local", plan=plan, example_inputs=(TOKENS,), groups=groups[r])
        return True

    assert world.run(rank) == [True, True]


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), world=st.sampled_from([2, 4]), cluster=st.sampled_from(["local", "h100"]),
       batch=st.sampled_from([2, 4]))
def test_random_user_models(seed, world, cluster, batch):
    """Random models from the block vocabulary: the planner's plan, and a random hand-forced plan the validator
    accepts, both equal one device; a forced plan the validator refuses is refused by Plan.validate (one
    process, before any rank runs)."""
    rng = random.Random(seed)
    model = build(random_lm_spec(rng))
    tokens = torch.zeros(batch, 8, dtype=torch.long)
    plan = planner_plan(model, cluster, world, tokens)
    for report in run_plan(model, plan, tokens, cluster):
        assert report.grad_error < 1e-4, (report, plan.summary())
    graph = trace(model, (tokens,))
    mesh = Mesh.of(mp=world) if rng.random() < 0.5 or batch < 2 else Mesh.of(dp=2, mp=world // 2)
    forced = random_forced_plan(graph, mesh, rng)
    try:
        forced.validate(graph, batch=batch, seq=8)
    except PlanError:
        return
    for report in run_plan(model, forced, tokens, cluster):
        assert report.grad_error < 1e-4, (report, forced.summary())


class BatchCentered(torch.nn.Module):
    """Subtracts the batch mean: exact only when every rank holds the whole batch."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.head(x - x.mean(0, keepdim=True))


def test_a_batch_mixing_op_is_never_data_parallel():
    torch.manual_seed(0)
    model = BatchCentered()
    graph = trace(model, (TOKENS,))
    with pytest.raises(PlanError, match=r"plan.ops\['mean'\]: mesh axis dp=2 is data parallel for this op, but "
                                        r"it mixes samples of the batch: mean over the batch dim"):
        Plan.build(graph, Mesh.of(dp=2), {}, axis=None).validate(graph)
    plan = planner_plan(model, "local", 2, TOKENS)
    assert plan.mesh.axis_size("dp") == 1 if "dp" in plan.mesh.names else True
    for report in run_plan(model, plan, TOKENS):
        assert report.grad_error < 1e-4


class UserAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, self.proj(x), is_causal=True)


def test_meshplans_strategies_are_not_offered_for_a_users_block():
    """register_leaf labels a block; the runtime's attention strategies compute meshplan's attention, not the
    block's, so only `replicate` is offered (and the planner never picks another)."""
    from meshplan.ir import register_leaf

    register_leaf(UserAttention, kind="attention", attrs=lambda m: {"n_heads": 4, "n_kv_heads": 4, "dim": 16,
                                                                     "head_dim": 4})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(32, 16), UserAttention(), torch.nn.Linear(16, 32))
    graph = trace(model, (TOKENS,))
    with pytest.raises(PlanError, match=r"plan.ops\['1'\].strategy: the runtime runs attention/sp only for "
                                        r"meshplan's own blocks.*\(allowed: replicate\)"):
        Plan.build(graph, Mesh.of(mp=2), {"1": "sp"}).validate(graph)
    on_one = Plan.build(graph, Mesh.of(dp=2, mp=1)).validate(graph)  # a 1-wide model axis: still not meshplan's math
    assert on_one.ops["1"].strategy == "replicate"
    plan = planner_plan(model, "h100", 2, TOKENS)
    assert plan.ops["1"].strategy == "replicate" or plan.ops["1"].axis is None
    for report in run_plan(model, plan, TOKENS):
        assert report.grad_error < 1e-4
