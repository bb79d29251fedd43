"""rl.plan -> meshplan.compile's arguments for the policy and the critic, checked in the launcher.

    plan: {cluster: local, mesh: "dp=1,mp=2", plan: auto}   # the planner on `local`, on that mesh
    plan: {plan: my-plan.yaml}                               # a plan written by `meshplan plan ... --out`
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
    if pc.plan != "auto":
        from ..ir import Plan

        path = Path(pc.plan)
        if not path.is_file():
            raise RLConfigError(f"rl.plan.plan: {pc.plan!r} is not 'auto' or a plan YAML file")
        try:
            plan = Plan.from_yaml(path)
        except Exception as e:  # noqa: BLE001
            raise RLConfigError(f"rl.plan.plan: {pc.plan!r}: {str(e).splitlines()[0]}") from None
        if plan.mesh.size != nproc:
            raise RLConfigError(f"rl.plan.plan: {pc.plan!r} has mesh {plan.mesh} ({plan.mesh.size} ranks), but "
                                f"train.nproc is {nproc}")


def compile_options(pc: PlanConfig, example: tuple[int, int], pad_id: int) -> dict:
    """build_engine's keywords: what meshplan.compile plans with, and the token shape to plan for."""
    return {"cluster": pc.cluster, "mesh": parse_mesh(pc.mesh) if pc.mesh else None,
            "plan": Path(pc.plan) if pc.plan != "auto" else "auto", "example": example, "verify": pc.verify,
            "pad_id": pad_id}
