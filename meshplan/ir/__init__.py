"""meshplan's IR: ops with sympy shapes, placements per mesh axis, and the Plan every stage reads or writes."""
from .graph import B, Graph, Op, S, TensorMeta
from .mesh import Mesh
from .ops import LeafSpec, register_leaf
from .placement import Partial, Placement, Replicate, Shard, parse_placement
from .tracer import TraceError, trace

__all__ = ["B", "S", "Graph", "Op", "TensorMeta", "Mesh", "LeafSpec", "register_leaf", "Partial", "Placement",
           "Replicate", "Shard", "parse_placement", "TraceError", "trace"]
from .plan import OpPlan, Plan, PlanError  # noqa: E402
from .strategies import STRATEGIES, Strategy, transition  # noqa: E402

__all__ += ["OpPlan", "Plan", "PlanError", "STRATEGIES", "Strategy", "transition"]
