"""The compiled Engine: meshplan.compile plans the policy and the value model; forward, gradient norm (clipped)
and AdamW steps equal the plain module's (one rank, and two processes under the planner's model-parallel plan);
the rollout module shares the replicated weights and gathers the sharded ones."""
import json

import torch

from meshplan.models import build_model, load_config
from meshplan.rl.checkpoint import latest_step, load_engines, save_run
from meshplan.rl.distributed import launch, one_rank_world, shard
from meshplan.rl.engine import CompiledEngine, make_optimizer, pad_multiples

TOKENS = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(0))


def _steps(engine, plain, clip: float, steps: int = 2):
    """`steps` AdamW steps on both (plain: torch's clip_grad_norm_); returns [(engine norm, plain norm)]."""
    opt = make_optimizer(plain.parameters(), 1e-2, (0.9, 0.999), 0.0)
    norms = []
    for _ in range(steps):
        engine.backward(engine(TOKENS).float().square().mean())
        plain(TOKENS).float().square().mean().backward()
        plain_norm = torch.nn.utils.clip_grad_norm_(list(plain.parameters()), clip)
        norms.append((engine.step(), float(plain_norm)))
        opt.step()
        opt.zero_grad()
    return norms


def test_engine_matches_the_plain_module():
    """One rank: bit-for-bit torch's clipping (runtime/grad_clip.py computes the norm as clip_grad_norm_ does on
    one rank) and the same weights; every parameter is replicated, so the rollout module shares all of them (no
    copy)."""
    with one_rank_world(60, "gloo"):
        for head in ("lm", "value"):
            plain = build_model(load_config("tiny"), head=head, seed=1)
            engine = CompiledEngine(build_model(load_config("tiny"), head=head, seed=1), lr=1e-2, grad_clip=0.05,
                                    example=(4, 12))
            torch.testing.assert_close(engine(TOKENS), plain(TOKENS))
            for got, want in _steps(engine, plain, 0.05):
                assert got == want and want > 0.05  # clipping was active
            full = engine.full_state_dict()
            for k, v in plain.state_dict().items():
                torch.testing.assert_close(full[k], v, atol=1e-6, rtol=1e-5)
            assert engine.shared_fraction == 1.0
            torch.testing.assert_close(engine.rollout_model()(TOKENS), plain(TOKENS), atol=1e-5, rtol=1e-4)


# one model-parallel plan per head on (dp=1, mp=2): tensor/expert/vocab parallel, and sequence parallel
PLANS = {"lm": {"attention": "tp", "moe": "ep", "embedding": "vocab"},
         "value": {"attention": "sp", "moe": "ag_scatter"}}


def _two_rank_worker(rank: int, world: int, outdir: str) -> None:
    from meshplan.ir import Mesh, Plan, trace

    report = {}
    for head in ("lm", "value"):
        plain = build_model(load_config("tiny"), head=head, seed=1)
        model = build_model(load_config("tiny"), head=head, seed=1)
        plan = Plan.build(trace(model), Mesh.of(dp=1, mp=2), PLANS[head], fallback=False)
        engine = CompiledEngine(model, lr=1e-2, grad_clip=0.05, plan=plan, example=(4, 12))
        fwd = (engine(TOKENS[:3, :11]) - plain(TOKENS[:3, :11])).abs().max().item()  # padded to the plan
        norms = _steps(engine, plain, 0.05)
        full = engine.full_state_dict()
        rel = max(((full[k] - v).norm() / v.norm().clamp_min(1e-12)).item() for k, v in plain.state_dict().items())
        rollout = (engine.rollout_model()(TOKENS) - plain(TOKENS)).abs().max().item()
        report[head] = {"forward": fwd, "weights_rel": rel, "norms": norms, "rollout": rollout,
                        "mesh": engine.plan.mesh.to_dict(), "shared": engine.shared_fraction,
                        "strategies": sorted({p.strategy for p in engine.plan.ops.values()}),
                        "resumed": _resume_is_exact(engine, head, plan, f"{outdir}/{head}")}
    with open(f"{outdir}/rank{rank}.json", "w") as f:
        json.dump(report, f)


def _resume_is_exact(engine, head: str, plan, root: str) -> bool:
    """Save the sharded engine as a run checkpoint, load it into an engine built from other weights, take one more
    step on both: weights, AdamW state and the rollout module must agree bit for bit."""
    save_run(root, 2, {"m": engine}, {"world": 2})
    fresh = CompiledEngine(build_model(load_config("tiny"), head=head, seed=7), lr=1e-2, grad_clip=0.05, plan=plan,
                           example=(4, 12))
    fresh.rollout_model()  # gathered once before the load: the load must make the next call gather again
    load_engines(latest_step(root), {"m": fresh})
    loaded = torch.equal(engine.rollout_model()(TOKENS), fresh.rollout_model()(TOKENS))
    for e in (engine, fresh):
        e.backward(e(TOKENS).float().square().mean())
        e.step()
    a, b = engine.full_state_dict(), fresh.full_state_dict()
    opt_a, opt_b = engine.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    same_opt = all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    rollout = torch.equal(engine.rollout_model()(TOKENS), fresh.rollout_model()(TOKENS))
    return all(torch.equal(a[k], b[k]) for k in a) and same_opt and rollout and loaded


def test_two_processes_under_model_parallel_plans(tmp_path):
    """World 2, mesh (dp=1, mp=2): TP attention + EP experts + vocab-parallel embedding (lm head), SP attention +
    ag_scatter experts (value head). Forward (on a shape the SP plan must pad), clipped gradient norm, weights
    after two AdamW steps and the rollout module equal the plain module's on both ranks; the rollout module shares
    the replicated parameters and gathers the sharded ones. A run checkpoint of the sharded engine resumes
    bit-identically.
    Mutations (benchmarks/mutations.py): clip-copies (replicated pieces counted twice): the norms differ;
    rl-stale-rollout (sharded weights never re-gathered): the rollout module differs; drop-grad-reduce: fails."""
    launch(_two_rank_worker, 2, str(tmp_path), timeout_s=120, backend="gloo")
    for r in range(2):
        report = json.loads((tmp_path / f"rank{r}.json").read_text())
        for head, rep in report.items():
            assert rep["mesh"] == {"dp": 1, "mp": 2} and set(PLANS[head].values()) <= set(rep["strategies"]), rep
            assert rep["forward"] < 1e-5 and rep["rollout"] < 1e-4, (r, head, rep)
            for got, want in rep["norms"]:
                assert abs(got - want) <= 1e-5 * want and want > 0.05, (r, head, rep["norms"])
            assert rep["weights_rel"] < 1e-4, (r, head, rep)  # AdamW divides out the gradient scale: fp32 sums
            assert 0.0 < rep["shared"] < 1.0, rep  # experts gathered, the rest shared
            assert rep["resumed"], (r, head)  # DCP save + load under the sharded plan, then a step: bit-identical


def test_pad_multiples_follow_the_plan():
    from meshplan.ir import Mesh, Plan, trace

    model = build_model(load_config("tiny"))
    assert pad_multiples(Plan.build(trace(model), Mesh.of(dp=4, mp=1))) == (4, 1)
    assert pad_multiples(Plan.build(trace(model), Mesh.of(dp=2, mp=2), {"attention": "sp"})) == (2, 2)


def test_shard_splits_prompts_in_order():
    items = list(range(10))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
