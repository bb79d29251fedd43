"""The planner: prices every strategy and precision of every op on a cluster (cost_model, collectives_cost,
memory, pricing), chooses them with an ILP (ilp) inside a search over mesh factorisations (mesh_search), and
writes the result as a meshplan Plan (plans). Baselines, simulation at scale and calibration build on the same
model. Entry points: `plan_model`, `simulate.simulate`, `baselines.baseline`, `plans.price_plan`."""
from __future__ import annotations

from .cluster import Cluster, ClusterError, load_cluster
from .mesh_search import PlannerError, Result, search
from .plans import Priced, price_plan, to_plan
from .pricing import CostModel, MeshConfig, Options


def plan_model(graph, cluster: Cluster, gpus: int, global_batch: int, options: Options | None = None,
               meta: dict | None = None, **restrict):
    """(Plan, Result): the best plan for `graph` on `gpus` GPUs of `cluster`, as a meshplan Plan. restrict:
    search()'s limits on the meshes tried (model_axis=[...], pp=[...]); meta: extra entries for plan.meta."""
    options = options or Options()
    r = search(graph, cluster, gpus, global_batch, options, **restrict)
    plan = to_plan(r.cost_model, r.mesh, r.problem, r.assignment, r.breakdown, global_batch,
                   {"meshes_searched": r.searched, "ilps_solved": r.solved, "plan_seconds": round(r.seconds, 3),
                    **(meta or {})})
    return plan, r


__all__ = ["Cluster", "ClusterError", "load_cluster", "PlannerError", "Result", "search", "Priced", "price_plan",
           "to_plan", "CostModel", "MeshConfig", "Options", "plan_model"]
