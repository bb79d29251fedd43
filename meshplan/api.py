"""`meshplan.compile`: trace, plan, schedule and (on a torch.distributed world) run a model under the plan.

    cm = meshplan.compile(model, cluster="h100", example_inputs=(tokens,))
    cm.plan            # the Plan it runs (a planner's choice, a Plan/YAML you gave, plus your overrides)
    cm.explain()       # per-op strategy, predicted compute / communication / memory
    logits = cm(tokens)

With no process group initialised, compile only plans (for `world_size` ranks) and the module runs the original
model on this process, so the same script plans on a laptop and runs under torchrun.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .ir import Graph, Mesh, Plan, PlanError, Shard, trace
from .ir import graph as G
from .ir.plan import OpPlan

_CACHE: dict[str, tuple[Graph, Plan]] = {}


@dataclass(frozen=True)
class _Key:
    structure: str
    inputs: tuple
    cluster: str
    world: int
    mesh: str
    plan: str
    error_budget: float | None

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()


def structure_signature(model: nn.Module) -> str:
    """Module types, leaf hyperparameters (the op attrs every strategy reads: routing, RoPE style, ...) and
    parameter shapes/dtypes: equal for two models that trace to the same IR."""
    from .ir.ops import leaf_spec

    h = hashlib.sha256()
    for name, m in model.named_modules():
        spec = leaf_spec(m)
        attrs = sorted(spec.attrs(m).items()) if spec is not None else ()
        h.update(f"{name}:{type(m).__qualname__}:{attrs!r};".encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()


def _cluster(cluster):
    from .planner import Cluster, load_cluster

    return cluster if isinstance(cluster, Cluster) else load_cluster(cluster)


def _world(world_size: int | None, mesh: Mesh | None, groups=None) -> int:
    if groups is not None:
        return groups.mesh.size
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world_size is not None and world_size != world:
            raise PlanError(f"compile(world_size={world_size}): the torch.distributed world has {world} ranks")
        return world
    return world_size or (mesh.size if mesh is not None else 1)


def _apply_overrides(plan: Plan, overrides: dict | str | Path | None) -> Plan:
    """Hand-written entries replace the planner's, op by op: a dict op -> entry, or a YAML file with `ops:`."""
    if overrides is None:
        return plan
    if not isinstance(overrides, dict):
        import yaml

        overrides = (yaml.safe_load(Path(overrides).read_text()) or {}).get("ops", {})
    partial = Plan.from_dict({"model": plan.model, "mesh": plan.mesh.to_dict(), "ops": overrides})
    out = copy.deepcopy(plan)
    out.ops.update(partial.ops)
    out.meta = {**out.meta, "overridden": sorted(partial.ops)}
    return out


def _auto_plan(graph: Graph, cluster, world: int, batch: int, seq: int, mesh: Mesh | None,
               error_budget: float | None) -> Plan:
    """The planner's choice for this world. The runtime executes no pipeline stages, so pp = 1."""
    from .planner import Options, plan_model

    # zero=False: the runtime all-reduces gradients and keeps whole optimizer state (priced as it runs).
    opts = Options(seq=seq, activation_dtype=activation_dtype(graph), zero=False)
    if error_budget is not None:
        opts.error_budget = error_budget
    model_axis = [mesh.shape[-1]] if mesh is not None else [n for n in range(1, world + 1) if world % n == 0]
    plan, _ = plan_model(graph, cluster, world, batch, opts, {"planned_for": f"{world} ranks of {cluster.name}"},
                         model_axis=model_axis, pp=[1])
    return _onto_mesh(plan, mesh) if mesh is not None else plan


def activation_dtype(graph: Graph) -> str | None:
    """The wire-format name of the model's activations (what a collective sends without conversion), from the
    traced graph: "fp32" or "bf16"; None (the cluster's) for anything else."""
    dtypes = {op.output.dtype for op in graph.ops() if op.kind in (G.ATTENTION, G.MOE) and op.output}
    return {"float32": "fp32", "bfloat16": "bf16"}.get(dtypes.pop()) if len(dtypes) == 1 else None


def _onto_mesh(plan: Plan, mesh: Mesh) -> Plan:
    """The planner's (dp, mp) plan laid onto the user's mesh: its model axis becomes the mesh's last axis, and
    every other axis of the mesh is data parallel."""
    model_axes = {p.axis for p in plan.ops.values() if p.axis is not None}
    n = plan.mesh.axis_size(model_axes.pop()) if model_axes else 1
    if mesh.shape[-1] != n or mesh.size != plan.mesh.size:
        raise PlanError(f"compile(mesh={mesh}): the planner chose {plan.mesh}; pass plan= to force a mesh")
    last = mesh.names[-1]
    ops = {}
    for name, p in plan.ops.items():
        on_model = (p.input[plan.mesh.index(p.axis)], p.output[plan.mesh.index(p.axis)]) if p.axis else None
        place = lambda i: tuple(on_model[i] if on_model and a == last else Shard(0) for a in mesh.names)  # noqa
        ops[name] = OpPlan(p.strategy, last if p.axis else None, place(0), place(1), dict(p.precision))
    return Plan(plan.model, mesh, ops, dict(plan.meta))


class CompiledModel(nn.Module):
    """The model under a plan. On a torch.distributed world it holds this rank's shards (a ParallelModel);
    otherwise it is the original model, and the plan is for inspection."""

    def __init__(self, model: nn.Module, graph: Graph, plan: Plan, cluster, batch: int, seq: int,
                 verify: bool | None = None, example: torch.Tensor | None = None, groups=None, init=None,
                 torch_compile: bool = False):
        super().__init__()
        self.graph, self.plan, self.cluster, self.batch, self.seq = graph, plan, cluster, batch, seq
        self._schedule = None
        self.verify_report = None
        if groups is not None or (dist.is_available() and dist.is_initialized()):
            from .runtime import ParallelModel

            self.module = ParallelModel(model, plan, graph, groups=groups, init=init, compile=torch_compile)
            self.distributed = True
            if verify or (verify is None and not any(p.is_meta for p in model.parameters())):
                self.verify_report = self._verify(model, example)
        else:
            self.module = model
            self.distributed = False

    def _verify(self, model: nn.Module, example: torch.Tensor | None):
        """One step against the single-device model on the example's smallest batch the plan runs (one sample
        per data-parallel shard; runtime/verify.py)."""
        from .runtime.verify import small_batch, verify, verify_tokens

        if any(p.is_meta for p in model.parameters()):
            raise PlanError("compile(verify=True): the model is on the meta device; verification needs the "
                            "single-device model's weights on this rank")
        example = example if example is not None else torch.zeros(self.batch, self.seq, dtype=torch.long)
        example = example[:small_batch(self.plan, self.graph, self.batch, self.seq)]
        return verify(self.module, model, self.graph, verify_tokens(self.graph, example))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: the global [B, S] batch (the same on every rank) -> the full output on every rank."""
        return self.module(tokens)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the global [B, S] batch; on a distributed world computed on this rank's
        shard of the logits without gathering them (runtime/loss_parallel.py)."""
        if self.distributed:
            return self.module.loss(tokens, targets)
        return F.cross_entropy(self.module(tokens).flatten(0, 1).float(), targets.flatten())

    def reduce_gradients(self) -> None:
        """Data-parallel gradient reduction; call after backward (a no-op off a distributed world)."""
        if self.distributed:
            self.module.reduce_gradients()

    @property
    def schedule(self):
        """The overlap schedule of one training step (codegen), priced with this cluster's cost model."""
        if self._schedule is None:
            from .codegen import build_task_graph, list_schedule
            from .codegen.durations import PlannerDurations

            tg = build_task_graph(self.graph, self.plan, self.batch, self.seq)
            self._schedule = list_schedule(tg, PlannerDurations(self.cluster, self.plan.mesh)).validate(set(tg.tasks))
        return self._schedule

    def explain(self) -> str:
        """Per op (identical layers grouped): strategy, predicted compute, communication, memory; then totals."""
        from .planner import Options, price_plan
        from .planner.explain import op_table

        priced = price_plan(self.graph, self.cluster, self.plan, self.batch,
                            Options(seq=self.seq, activation_dtype=activation_dtype(self.graph), zero=False))
        bd = priced.breakdown
        head = (f"{self.plan.summary()}\npredicted on {self.cluster.name}: step {bd.step * 1e3:.3f} ms, "
                f"peak memory {max(bd.memory) / 2**30:.3f} GiB per rank")
        return head + "\n" + op_table(priced.problem, priced.assignment, bd)

    def save_plan(self, path: str | Path) -> None:
        self.plan.to_yaml(path)


def compile(model: nn.Module, *, cluster="h100", mesh: Mesh | dict | None = None,
            plan: str | Path | Plan = "auto", example_inputs: tuple | None = None,
            error_budget: float | None = 0.0, overrides: dict | str | Path | None = None,
            world_size: int | None = None, strategies: dict[str, str] | None = None, verify: bool | None = None,
            groups=None, init=None, torch_compile: bool = False) -> CompiledModel:
    """Compile `model` for the current torch.distributed world (or `world_size` ranks when none is initialised).

    cluster: a name in configs/clusters/ (h800, h100, h200, local), a YAML path or a planner Cluster.
    mesh: fixes the mesh (its last axis is the model axis); default: the planner searches.
    plan: "auto" (the planner), a Plan, or a plan YAML path.
    example_inputs: (tokens,) of the global batch shape [B, S]; default [world, max_seq_len or 128].
    error_budget: the planner's bound on compression error. 0 (the default): every collective in the model's
        own precision, so the compiled model computes what the single-device model computes; pass a budget
        (None: the planner's default) to let it pick bf16/FP8 collectives.
    overrides: op entries (a dict or a plan-like YAML) that replace the chosen plan's, validated like the rest.
    verify: run one forward+backward against the single-device model before returning, raising
        PlanVerificationError naming the first op whose output differs (None: on a distributed world whenever the
        model's weights are materialised on this rank; runtime/verify.py).
    groups: the mesh's process groups for an in-process world (runtime.LocalWorld); default: torch.distributed's.
    init: the weights of a model built on the meta device (runtime/materialize.py): a function yielding (name, full
        tensor), e.g. materialize.seeded_init(model, seed), or a DCP checkpoint directory; each rank fills only its
        shards.
    torch_compile: run each op's parallel implementation through torch.compile(fullgraph=True) on this rank
        (runtime/compile.py: which ops stay eager and why); needs fp32 collectives (error_budget=0).
    strategies: op kind -> strategy (e.g. {"attention": "sp", "moe": "ep"}), forced on every op of that kind on
        the mesh's last axis (default mesh: all ranks on one model axis); other kinds get Plan.build's defaults.
    A Hugging Face causal LM (transformers' *ForCausalLM) is compiled through meshplan.hf.adapt: the compiled
    module maps tokens to logits [B, S, V] with the HF model's own parameters.
    Recompiles are cached by (model structure, input shapes, cluster, world size, mesh, plan, error budget)."""
    if type(model).__module__.startswith("transformers."):  # never imports transformers itself
        from .hf import adapt

        model = adapt(model)
    mesh = Mesh.from_dict(mesh) if isinstance(mesh, dict) else mesh
    world = _world(world_size, mesh, groups)
    _check_strategies(strategies, plan)
    if example_inputs is None:
        seq = getattr(getattr(model, "config", None), "max_seq_len", 128)
        example_inputs = (torch.zeros(world, seq, dtype=torch.long),)
    tokens = example_inputs[0]
    batch, seq = int(tokens.shape[0]), int(tokens.shape[1])
    cl = _cluster(cluster)
    plan_key = plan.to_yaml() if isinstance(plan, Plan) else str(plan) + repr(sorted((strategies or {}).items()))
    key = _Key(structure_signature(model), tuple((tuple(t.shape), t.dtype) for t in example_inputs),
               repr(cl), world, str(mesh), plan_key, error_budget).digest()
    if key in _CACHE:
        graph, chosen = _CACHE[key]
    else:
        graph = trace(model, example_inputs)
        if isinstance(plan, Plan):
            chosen = plan
        elif strategies:
            chosen = Plan.build(graph, mesh or Mesh.of(mp=world), strategies, fallback=False)
        elif str(plan) == "auto":
            chosen = _auto_plan(graph, cl, world, batch, seq, mesh, error_budget)
        else:
            chosen = Plan.from_yaml(Path(plan))
        _CACHE[key] = (graph, chosen)
    chosen = _apply_overrides(chosen, overrides)
    chosen.validate(graph, batch=batch, seq=seq)
    if chosen.mesh.size != world:
        raise PlanError(f"plan.mesh: {chosen.mesh} has {chosen.mesh.size} ranks, but the world has {world}")
    return CompiledModel(model, graph, chosen, cl, batch, seq, verify, tokens, groups, init, torch_compile)


def _check_strategies(strategies: dict | None, plan) -> None:
    from .ir.strategies import STRATEGIES

    if not strategies:
        return
    if not isinstance(plan, str) or plan != "auto":
        raise PlanError("compile(strategies=...): give either strategies or a plan, not both")
    for kind, name in strategies.items():
        if kind not in STRATEGIES:
            raise PlanError(f"compile(strategies=...): {kind!r} is not an op kind (kinds: {', '.join(STRATEGIES)})")
        if name not in STRATEGIES[kind]:
            raise PlanError(f"compile(strategies[{kind!r}]): {name!r} is not a {kind} strategy "
                            f"(valid: {', '.join(STRATEGIES[kind])})")


def cache_info() -> int:
    """How many compiled (graph, plan) pairs are cached."""
    return len(_CACHE)


__all__ = ["CompiledModel", "compile", "cache_info", "structure_signature"]
