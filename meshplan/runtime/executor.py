"""ParallelModel: run a model under a Plan on this rank, op by op, forward and backward.

The executor walks the IR in topological order. Before each op it moves every input from its producer's output
placement to the op's input placement (redistribute.py: the collectives follow from the placements alone), then
calls the op's implementation for its (kind, strategy) with this rank's parameter shards. Generic ops re-run their
fx node on local shards. The output is gathered to every rank, and its gradient seeded on one rank, which is what
makes "every rank computes the same loss and calls backward" give each rank its shards' true gradients.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from ..ir import graph as G
from ..ir.graph import Graph, Op
from ..ir.placement import Placement, Replicate, Shard
from ..ir.plan import Plan, PlanError, evaluate_shape
from ..ir.tracer import trace
from . import materialize, sharding
from .batch_sizes import check_sizes, global_sizes
from .collectives import seed_grad
from .comm_stats import CommStats
from .compile import CompiledOp, check_compilable, wants_compile
from .data_parallel import GradReducer
from .device_mesh import device_mesh
from .grad_overlap import BucketLauncher, launch_list
from .implementations import IMPLEMENTATIONS, Impl
from .local_ops import run_module
from .loss_parallel import align_targets, cross_entropy
from .op_context import OpContext
from .parameters import ShardedParameters
from .process_groups import MeshGroups, check_world_size
from .recompute import recomputed_ops, run_recomputed
from .redistribute import normalize, redistribute


class ParallelModel(ShardedParameters, nn.Module):
    """`model` under `plan` on this rank.

    model: the full single-device model, built with the same seed on every rank (its weights are sliced into this
        rank's shards; it must not be shared between the ranks of an in-process world: ops run its modules).
    plan: validated against `graph` (default: trace(model)) and against the world size before any collective;
        a misfit raises PlanError naming both numbers.
    groups: the mesh's process groups (default: built from the initialised default group; a 1-rank mesh needs
        none); LocalWorld.groups(mesh) gives them for in-process worlds.
    bucket_mb: gradient bucket size of reduce_gradients; timeout_s: collective timeout of the groups it builds.
    overlap_grad_reduce: issue each gradient bucket's reduction from the backward, as soon as its last gradient
        has accumulated (grad_overlap.py); reduce_gradients() then waits. Results are bit-identical either way.
    init: where the weights come from when `model` was built on the meta device (materialize.py): a function
        yielding (name, full tensor) such as materialize.seeded_init(model, seed), or a DCP checkpoint directory;
        each rank then allocates and fills only its shards.
    compile: run each op's implementation through torch.compile(fullgraph=True) (compile.py: which ops stay eager
        and why); the numerics are eager's, within float tolerance.

    parameters() are DTensors, as torchtitan's parallelize makes them: each an nn.Parameter holding a DTensor on
    device_mesh(groups) with the plan's placements, whose global shape is the model's and whose local tensor is
    this rank's shard (torch's optimizers step them as they are). On a one-rank mesh there is no DeviceMesh and
    they are plain tensors, the whole parameters. The ops get the local shards (`to_local()`); the gradient of a
    parameter replicated on some axes arrives there as a Partial sum (device_mesh.grad_placements), and
    reduce_gradients() sums it, leaving `p.grad` a DTensor with the parameter's own placements.
    pm(tokens) takes the global [B, S] batch on every rank and returns the full output on every rank; after
    loss.backward() on every rank and reduce_gradients(), every parameter holds its true gradient.
    """

    def __init__(self, model: nn.Module, plan: Plan, graph: Graph | None = None, *, groups: MeshGroups | None = None,
                 bucket_mb: float = 25.0, timeout_s: float | None = None, stage: set[str] | None = None,
                 init: materialize.WeightSource | None = None, compile: bool = False,
                 overlap_grad_reduce: bool = False):
        super().__init__()
        if init is None and materialize.is_meta(model):
            raise PlanError("model: its parameters are on the meta device; pass init= (a weight source: "
                            "materialize.seeded_init(model, seed) or a DCP checkpoint directory)")
        if plan.pipeline.enabled and stage is None:
            raise PlanError(f"plan.mesh.pp={plan.pipeline.stages}: a pipeline plan runs one ParallelModel per stage "
                            f"(runtime/pipeline.py PipelineRunner, or `meshplan run`)")
        # Everything that can be wrong with the plan is checked before any collective runs.
        world = groups.mesh.size if groups is not None else (dist.get_world_size() if dist.is_initialized() else 1)
        check_world_size(plan.mesh, world)
        if groups is not None and groups.mesh != plan.mesh:
            raise PlanError(f"plan.mesh {plan.mesh} differs from the process groups' mesh {groups.mesh}")
        graph = graph if graph is not None else trace(model)
        plan.validate(graph)
        if compile:
            check_compilable(plan)
        self.compile = compile
        self._compiled: dict[str, CompiledOp] = {}  # op name -> its compiled implementation (compile=True)
        object.__setattr__(self, "_model", model)  # not a submodule: its full weights are not ours
        self.graph, self.plan = graph, plan
        # stage: the names of the ops this rank runs (a pipeline stage's); its parameters are the only ones held.
        self._ops = [op for op in graph.ops() if stage is None or op.name in stage]
        self._stage = stage
        self._fx_nodes = {n.name: n for n in graph.module.graph.nodes} if graph.module is not None else {}
        self._modules_of = {op.name: self._module_of(op) for op in self._ops}
        self._check_supported()

        if groups is None:
            world_groups = dist.is_initialized()
            groups = MeshGroups.from_world(plan.mesh, timeout_s) if world_groups else MeshGroups.single(plan.mesh)
        self.groups = groups
        self.axes = groups.ordered()
        self._device_mesh = device_mesh(groups)  # torch's DeviceMesh over the same groups (device_mesh.py)
        self.comm_stats = CommStats()
        self._op_of_node = dict(graph.node_ops) or {op.node: op.name for op in self._ops if op.node}
        if materialize.is_meta(model):
            materialize.real_buffers(model)  # small (RoPE tables): computed in full before _shard_parameters
        self._shard_parameters(model)
        if init is not None:  # each shard was allocated empty (_add_shard): fill it, one full parameter at a time
            materialize.fill(self, init)
        self._validated: set[tuple[int, int]] = set()
        self._recompute = recomputed_ops(plan, self._ops)  # plan.meta.activation_recompute (recompute.py)
        self._reducer = GradReducer(self._grad_entries(), self.comm_stats, bucket_mb)
        self.grad_launcher: BucketLauncher | None = None  # the hooks of overlap_grad_reduce (zero.py installs its own)
        if overlap_grad_reduce:
            self.grad_launcher = BucketLauncher(launch_list(self._reducer.buckets), self._reducer.bucket_steps)
        # op name -> an implementation that replaces IMPLEMENTATIONS' for that op (same signature and result):
        # how runtime/overlap.py runs the emitted overlap code for the chunked ops.
        self.op_overrides: dict[str, Impl] = {}
        # On CUDA, the stream the emitted overlap code issues its collectives on (async_collectives.py).
        self.comm_stream = torch.cuda.Stream(groups.device) if groups.device.type == "cuda" else None
        # When a dict, every op's local output and its placement are kept in it (verify.py compares them).
        self.record: dict[str, tuple[torch.Tensor, tuple[Placement, ...]]] | None = None

    # ---- set-up ------------------------------------------------------------------------------------------
    def _module_of(self, op: Op) -> nn.Module | None:
        if op.is_leaf:
            return self._model.get_submodule(op.name)
        node = self._fx_nodes.get(op.node)
        if node is not None and node.op == "call_module":
            return self._model.get_submodule(node.target)
        return None

    def _check_supported(self) -> None:
        for op in self._ops:
            if op.kind in (G.INPUT, G.OUTPUT):
                continue
            p = self.plan.ops[op.name]
            if op.kind != G.GENERIC and (op.kind, p.strategy) not in IMPLEMENTATIONS:
                raise PlanError(f"plan.ops[{op.name!r}].strategy: the runtime has no implementation of "
                                f"{op.kind}/{p.strategy}")
            have = {n for n, _ in self._modules_of[op.name].named_parameters()} if self._modules_of[op.name] else set()
            missing = [n for n in sharding.REQUIRED.get((op.kind, p.strategy), ()) if n not in have]
            if missing:
                raise PlanError(f"plan.ops[{op.name!r}]: the runtime's {op.kind}/{p.strategy} needs the parameters "
                                f"{missing} (as in meshplan.models); {type(self._modules_of[op.name]).__name__} "
                                f"has {sorted(have)}")

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The full output on every rank; differentiable with replicated semantics."""
        local, placement = self._run_graph(tokens)
        full = redistribute(local, placement, self._replicated(), self.axes, op="return", tag="in0",
                            stats=self.comm_stats)
        return seed_grad(full, keep=self.groups.is_root) if full.requires_grad else full

    def local_forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple[Placement, ...]]:
        """This rank's shard of the output and its placement, without gathering it. A loss computed on shards is
        the sum of the ranks' losses over the Shard axes (e.g. a token sum divided by the global token count);
        ranks that hold the same Replicate shard compute the same loss, and it is counted once. A Partial output
        (a row-parallel last op) is a summand: reduce it before any non-linear loss."""
        local, placement = self._run_graph(tokens)
        if local.requires_grad:
            first = all(g.index == 0 for g, p in zip(self.axes, placement) if isinstance(p, Replicate))
            local = seed_grad(local, keep=first)
        return local, placement

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, local: bool = False) -> torch.Tensor:
        """The mean cross-entropy over the global batch, computed on this rank's shard of the logits without
        gathering them (loss_parallel.py); the same scalar on every rank, ready for backward() on every rank.
        tokens, targets: the global [B, S] batch on every rank, or with local=True this rank's shard of it laid
        out as input_placement() (what data.py's loaders yield)."""
        logits, placement = self._run_graph(tokens, local)
        targets = align_targets(targets.to(self.groups.device), self._token_placement, placement, self.axes,
                                self.comm_stats)
        batch, seq = self._sizes
        return cross_entropy(logits, placement, targets, self.axes, batch * seq, root=self.groups.is_root,
                             stats=self.comm_stats)

    def input_placement(self) -> tuple[Placement, ...]:
        """The placement the ops reading the token ids want them in: where per-rank data is fed (Shard(0) on the
        data-parallel axes, Shard(1) on a sequence-parallel model axis)."""
        wanted = {self.plan.ops[op.name].input for op in self._ops if op.kind not in (G.INPUT, G.OUTPUT)
                  for i, src in enumerate(op.inputs) if i not in op.shape_only and self._is_tokens(src)}
        if len(wanted) > 1:
            raise PlanError(f"plan: the ops reading the token ids want them in different placements "
                            f"{sorted(map(str, wanted))}; feed the global batch instead of per-rank shards")
        return normalize(wanted.pop(), 2) if wanted else self._replicated()

    def _is_tokens(self, name: str) -> bool:
        op = self.graph.op(name)
        return op.kind == G.INPUT and "param" not in op.attrs

    def _run_graph(self, tokens: torch.Tensor, local: bool = False, env: dict[str, torch.Tensor] | None = None):
        """(this rank's shard of the output, its placement). A pipeline stage without the output op starts from
        `env` (the tensors received from the previous stage) and returns (every value it computed, None)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected [batch, seq], got shape {tuple(tokens.shape)}")
        self._token_placement = self.input_placement() if local else self._replicated()
        batch, seq = global_sizes(tokens.shape, self._token_placement, self.axes)
        self._validate_sizes(batch, seq)
        self._sizes = (batch, seq)
        tokens = tokens.to(self.groups.device)
        self._locals = {}
        env = dict(env or {})
        cache: dict[tuple, torch.Tensor] = {}
        for op in self._ops:
            if op.kind == G.INPUT:
                env[op.name] = self._fetch_attr(op) if "param" in op.attrs else tokens
            elif op.kind == G.OUTPUT:
                if len(op.inputs) != 1:
                    raise NotImplementedError(f"the runtime returns one output tensor; the model returns "
                                              f"{len(op.inputs)}")
                src = op.inputs[0]
                return env[src], self.plan.ops[src].output
            else:
                ins = [self._input(op, i, src, env, cache) for i, src in enumerate(op.inputs)]
                ctx = OpContext(op, self.plan.ops[op.name], self._modules_of[op.name], self._op_params(op), self.axes,
                                self.comm_stats, batch, seq, self.comm_stream)
                if op.name in self._recompute:
                    env[op.name] = run_recomputed(lambda *xs, op=op, ctx=ctx: self._run(op, ctx, list(xs)), *ins)
                else:
                    env[op.name] = self._run(op, ctx, ins)
                if self.record is not None:
                    self.record[op.name] = (env[op.name], self.plan.ops[op.name].output)
        if self._stage is not None:
            return env, None
        raise RuntimeError("the graph has no output op")

    def _input(self, op: Op, i: int, src: str, env: dict, cache: dict) -> torch.Tensor:
        src_op = self.graph.op(src)
        p = self.plan.ops[op.name]
        if i in op.shape_only:
            return self._stand_in(src_op, p.input, env[src])
        if src_op.kind == G.INPUT:
            if "param" in src_op.attrs:
                return env[src]  # a parameter read by a generic op: replicated, passed as is
            placement_from = self._token_placement  # the global batch, or this rank's shard of it
        else:
            placement_from = self.plan.ops[src].output
        tag = f"in{i}"
        prec = p.precision.get(tag, "fp32")
        key = (src, p.input, prec)
        if key not in cache:
            cache[key] = redistribute(env[src], placement_from, p.input, self.axes, op=op.name, tag=tag,
                                      precision=prec, stats=self.comm_stats)
        return cache[key]

    def _stand_in(self, src: Op, placement: tuple[Placement, ...], value: torch.Tensor) -> torch.Tensor:
        """What an op that reads `src` only for its size gets: a tensor of the local shape under the op's own
        input placement (stride 0, no memory, no communication), with the source's dtype and device."""
        shape = list(evaluate_shape(src.output.shape, *self._sizes))
        for g, pl in zip(self.axes, placement):
            if isinstance(pl, Shard) and g.size > 1:
                shape[pl.dim] //= g.size
        return torch.empty((), dtype=value.dtype, device=value.device).expand(shape)

    def _run(self, op: Op, ctx: OpContext, ins: list[torch.Tensor]) -> torch.Tensor:
        """The op's value on this rank: its strategy's implementation, or (generic ops) its fx node on local
        values; of a module that returns a tuple, the element its readers take (attrs["tuple_index"])."""
        if op.kind != G.GENERIC:
            impl = self.op_overrides.get(op.name)
            if impl is None:
                impl = IMPLEMENTATIONS[(op.kind, ctx.plan.strategy)]
                if self.compile and wants_compile(op.kind):
                    impl = self._compiled.setdefault(op.name, CompiledOp(impl))
            out = impl(ctx, *ins[:len(ins) - len(op.shape_only)])
        else:
            out = self._run_node(op, ctx, ins)
        return out[op.attrs["tuple_index"]] if "tuple_index" in op.attrs else out

    def _run_node(self, op: Op, ctx: OpContext, ins: list[torch.Tensor]):
        node = self._fx_nodes[op.node]
        produced = dict(zip(op.inputs, ins))
        values: dict[str, object] = {}

        def value(n: fx.Node):
            if n.name in self._op_of_node:
                src = self._op_of_node[n.name]
                if src not in produced:  # the tracer gives every op the tensors it reads: never reached
                    raise RuntimeError(f"op {op.name!r} reads {src!r}, which is not one of its inputs")
                return produced[src]
            if n.name not in values:  # a non-tensor node (a size, a tuple): evaluate it on local values
                values[n.name] = self._call(n, *fx.node.map_arg((n.args, n.kwargs), value), ctx)
            return values[n.name]

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        return self._call(node, args, kwargs, ctx)

    def _call(self, node: fx.Node, args, kwargs, ctx: OpContext):
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return run_module(ctx, list(args), kwargs)
        raise NotImplementedError(f"fx node {node.format_node()}")

    def _fetch_attr(self, op: Op) -> torch.Tensor:
        target = op.attrs["param"]
        if target in self._aliases:
            return self._param_local(self._aliases[target])
        obj = self._model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj.to(self.groups.device) if isinstance(obj, torch.Tensor) else obj

    def _validate_sizes(self, batch: int, seq: int) -> None:
        if (batch, seq) not in self._validated:
            check_sizes(self.plan, self.graph, self._ops, self._buffers, batch, seq)
            self._validated.add((batch, seq))

    # ---- training utilities ----------------------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        """Sum the gradients of replicated shards over the ranks that share them (after backward; with
        overlap_grad_reduce, wait for the reductions the backward issued)."""
        if self.grad_launcher is not None:
            self.grad_launcher.finish()
        else:
            self._reducer.reduce()

    @contextmanager
    def no_grad_sync(self):
        """Backward inside accumulates gradients without issuing their reduction (earlier micro-batches)."""
        launcher, armed = self.grad_launcher, self.grad_launcher is not None and self.grad_launcher.armed
        if launcher is not None:
            launcher.armed = False
        try:
            yield
        finally:
            if launcher is not None:
                launcher.armed = armed
