"""Run a user's model under a plan on an in-process world through `meshplan.compile(..., verify=True)`."""
from __future__ import annotations

import copy
import random

import torch

import meshplan
from meshplan.ir import Mesh, OpPlan, Plan
from meshplan.ir import graph as G
from meshplan.ir.strategies import BATCH, STRATEGIES, divisibility_error
from meshplan.runtime import LocalWorld


def planner_plan(model, cluster: str, world: int, tokens: torch.Tensor) -> Plan:
    """What compile(plan="auto") chooses for `world` ranks (planned on this process, no world needed)."""
    return meshplan.compile(model, cluster=cluster, world_size=world, example_inputs=(tokens,)).plan


def run_plan(model, plan: Plan, tokens: torch.Tensor, cluster: str = "local") -> list:
    """Every rank compiles its own copy of `model` under `plan` with verify=True (one step against the
    single-device model, raising PlanVerificationError on a difference); returns the ranks' VerifyReports.
    The plan is validated and the model traced here first, on one process, as compile does before any rank."""
    world_size = plan.mesh.size
    meshplan.compile(model, cluster=cluster, plan=plan, world_size=world_size, example_inputs=(tokens,))
    models = [copy.deepcopy(model) for _ in range(world_size)]
    world = LocalWorld(world_size, timeout_s=30)
    groups = world.groups(plan.mesh)

    def rank(r):
        cm = meshplan.compile(models[r], cluster=cluster, plan=plan, example_inputs=(tokens,), groups=groups[r],
                              verify=True)
        return cm.verify_report

    return world.run(rank)


def random_forced_plan(graph, mesh: Mesh, rng: random.Random) -> Plan:
    """A hand-written plan a user might force: every op a random strategy of its kind (any io variant) on the
    last mesh axis, data parallel on the others. Nothing filters what the runtime can run: the validator must."""
    axis = mesh.names[-1]
    ops = {}
    for op in graph.ops():
        if op.kind in (G.INPUT, G.OUTPUT):
            continue
        names = [s for s in STRATEGIES[op.kind] if divisibility_error(op, s, axis, mesh.axis_size(axis)) is None]
        strategy = rng.choice(names)
        i, o = rng.choice(STRATEGIES[op.kind][strategy].io)
        place = lambda p: tuple(p if a == axis else BATCH for a in mesh.names)  # noqa: E731
        ops[op.name] = OpPlan(strategy, axis, place(i), place(o))
    return Plan(graph.name, mesh, ops)


def sharded_ops(plan: Plan) -> list[str]:
    """Ops whose strategy splits something across a model axis of size > 1."""
    return [n for n, p in plan.ops.items()
            if p.axis is not None and plan.mesh.axis_size(p.axis) > 1 and p.strategy not in ("replicate",)]
