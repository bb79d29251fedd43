"""rl.plan -> meshplan.compile's arguments for the policy and the critic, checked in the launcher.

    plan: {cluster: local, mesh: "dp=1,mp=2", plan: auto}   # the planner on `local`, on that mesh
    plan: {plan: my-plan.yaml, critic_plan: critic.yaml}     # plans written by `meshplan plan ... --out`
    plan: {mesh: "dp=1,mp=2", strategies: "attention=tp,moe=ep"}  # forced strategies, no planner
"""
from __future__ import annotations

from pathlib import Path

from ..ir import Mesh
from .config import PlanConfig, RLConfigError


def parse_mesh(text: str) -> Mesh:
    """ "dp=1,mp=2" -> Mesh.of(dp=1, mp=2) (outermost axis first; the last is the model axis)."""
    axes = []
    for part in text.replace(" ", "").split(","):
        name, eq, size = part.partition("=")
        if not eq or not size.isdigit() or not name.isidentifier():
            raise RLConfigError(f"rl.plan.mesh: expected axes like 'dp=1,mp=2', got {text!r}")
        axes.append((name, int(size)))
    try:
        return Mesh(tuple(axes))
    except ValueError as e:
        raise RLConfigError(f"rl.plan.mesh: {e}") from None


def parse_strategies(text: str) -> dict[str, str]:
    """ "attention=tp,moe=ep" -> {"attention": "tp", "moe": "ep"} (op kind -> strategy)."""
    from ..ir.strategies import STRATEGIES

    out = {}
    for part in text.replace(" ", "").split(","):
        kind, eq, name = part.partition("=")
        if not eq or kind not in STRATEGIES or name not in STRATEGIES[kind]:
            known = "; ".join(f"{k}: {'/'.join(v)}" for k, v in STRATEGIES.items())
            raise RLConfigError(f"rl.plan.strategies: {part!r} is not KIND=STRATEGY ({known})")
        out[kind] = name
    return out


def _plan_file(field: str, value: str, nproc: int):
    from ..ir import Plan

    path = Path(value)
    if not path.is_file():
        raise RLConfigError(f"rl.plan.{field}: {value!r} is not 'auto' or a plan YAML file")
    try:
        plan = Plan.from_yaml(path)
    except Exception as e:  # noqa: BLE001 - one line naming the field
        raise RLConfigError(f"rl.plan.{field}: {value!r}: {str(e).splitlines()[0]}") from None
    if plan.mesh.size != nproc:
        raise RLConfigError(f"rl.plan.{field}: {value!r} has mesh {plan.mesh} ({plan.mesh.size} ranks), but "
                            f"train.nproc is {nproc}")
    return plan


def check_plan_config(pc: PlanConfig, nproc: int) -> None:
    """The plan section against the world: one RLConfigError naming the field."""
    from ..planner import load_cluster

    try:
        load_cluster(pc.cluster)
    except Exception as e:  # noqa: BLE001 - a missing file, a bad YAML, an invalid field: one line
        raise RLConfigError(f"rl.plan.cluster: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if pc.mesh is not None:
        mesh = parse_mesh(pc.mesh)
        if mesh.size != nproc:
            raise RLConfigError(f"rl.plan.mesh: {mesh} has {mesh.size} ranks, but train.nproc is {nproc}")
        if pc.plan != "auto":
            raise RLConfigError("rl.plan.mesh: give a mesh for the planner or a plan file, not both")
    if pc.strategies is not None:
        parse_strategies(pc.strategies)
        if pc.plan != "auto" or pc.critic_plan != "auto":
            raise RLConfigError("rl.plan.strategies: give strategies or plan files, not both")
    for field in ("plan", "critic_plan"):
        if getattr(pc, field) != "auto":
            _plan_file(field, getattr(pc, field), nproc)


def compile_options(pc: PlanConfig, example: tuple[int, int], pad_id: int, critic: bool = False) -> dict:
    """build_engine's keywords for the policy (or the critic): what meshplan.compile plans with, and the token
    shape to plan for."""
    mesh = parse_mesh(pc.mesh) if pc.mesh else None
    chosen = pc.critic_plan if critic else pc.plan
    if critic and chosen == "auto" and pc.plan != "auto":  # the planner, on the policy plan's mesh
        from ..ir import Plan

        mesh = Plan.from_yaml(Path(pc.plan)).mesh
    return {"cluster": pc.cluster, "mesh": mesh, "plan": Path(chosen) if chosen != "auto" else "auto",
            "strategies": parse_strategies(pc.strategies) if pc.strategies else None, "example": example,
            "verify": pc.verify, "pad_id": pad_id}
