"""PipelineRunner: run a plan's pipeline stages (ir/pipeline.py), one ParallelModel per stage, 1F1B or GPipe.

Rank r of a pp x (dp x mp) world is stage r // (dp·mp); inside its stage it is an ordinary ParallelModel rank on
the stage's own (dp, mp) sub-mesh, holding only its stage's parameters and running its ops under the plan's
strategies. Between stages, the tensors a later stage reads (for a transformer, the residual stream) travel as
this rank's local shards, rank to rank at the same (dp, mp) coordinate: the same placement on both sides, so no
resharding and no gather, and the gradient convention of collectives.py carries over unchanged (a Replicate
activation's gradient arrives as the same Partial summand the next stage's backward produced).

Why a schedule of our own instead of torch.distributed.pipelining's PipelineStage/Schedule1F1B: a stage here
exchanges several tensors whose shapes depend on each call's micro-batch and placements, the in-process test
worlds (LocalWorld) have no default process group for pipelining's P2POps, and the loss is computed on local
shards (loss_parallel.py) with meshplan's seeded-gradient convention. The schedule is the non-interleaved 1F1B
of Megatron-LM (PipeDream-Flush): stage s runs min(pp - s - 1, m) warm-up forwards, then alternates one forward
and one backward, then drains the backwards; sends are asynchronous and receives block, which is deadlock-free
in this order. GPipe (all forwards, then all backwards) is the other choice. Both have the planner's bubble
fraction (pp - 1) / (m + pp - 1) (docs/reference.md, "Pipeline schedules").
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..ir import graph as G
from ..ir.graph import Graph
from ..ir.mesh import Mesh
from ..ir.pipeline import AXIS as PP_AXIS
from ..ir.plan import Plan, PlanError
from ..ir.tracer import trace
from . import materialize
from .batch_sizes import global_sizes
from .collectives import Channel, all_reduce
from .comm_stats import BWD, FWD
from .executor import ParallelModel
from .loss_parallel import align_targets, cross_entropy
from .process_groups import MeshGroups

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_HEADER = 8  # ndim, dtype code, up to 6 sizes


def full_mesh(plan: Plan) -> Mesh:
    """The world's mesh: pp outermost, then the stage mesh's axes."""
    return Mesh(((PP_AXIS, plan.pipeline.stages), *plan.mesh.axes))


def stage_ops(graph: Graph, plan: Plan) -> tuple[list[set[str]], list[list[str]]]:
    """(the ops of each stage, the tensors crossing each boundary k -> k+1 in graph order). A graph input is
    in every stage that reads it; a tensor read two stages later passes through the stages between."""
    stage_of = plan.pipeline.stage_of(graph)
    pp = plan.pipeline.stages
    ops = [{n for n, s in stage_of.items() if s == k} for k in range(pp)]
    crossing: list[list[str]] = [[] for _ in range(pp - 1)]
    for op in graph.ops():
        for src in op.inputs:
            src_op = graph.op(src)
            if src_op.kind == G.INPUT:
                ops[stage_of[op.name]].add(src)
                continue
            for k in range(stage_of[src], stage_of[op.name]):
                if src not in crossing[k]:
                    crossing[k].append(src)
    order = {op.name: i for i, op in enumerate(graph.ops())}
    return ops, [sorted(c, key=order.get) for c in crossing]


def check_untied(model: nn.Module, graph: Graph, ops: list[set[str]]) -> None:
    """A parameter used by two stages (tied embeddings) would need its gradient summed over pp: refused."""
    nodes = {n.name: n for n in graph.module.graph.nodes} if graph.module is not None else {}
    owner: dict[int, tuple[int, str]] = {}
    for k, names in enumerate(ops):
        for name in sorted(names):
            op = graph.op(name)
            node = nodes.get(op.node)
            if op.is_leaf:
                params = model.get_submodule(name).named_parameters(prefix=name)
            elif node is not None and node.op == "call_module":
                params = model.get_submodule(node.target).named_parameters(prefix=node.target)
            elif op.kind == G.INPUT and "param" in op.attrs:
                params = [(op.attrs["param"], model.get_parameter(op.attrs["param"]))]
            else:
                continue
            for pname, p in params:
                first = owner.setdefault(id(p), (k, pname))
                if first[0] != k:
                    raise PlanError(f"plan.pipeline: parameter {first[1]} is used by stages {first[0]} and {k} "
                                    f"(tied weights, also read as {pname}); the runtime does not share weights "
                                    f"across pipeline stages: untie them or use pp=1")


class PipelineRunner:
    """This rank's stage of `plan`. groups: MeshGroups of full_mesh(plan) (LocalWorld.groups(full_mesh(plan))
    in-process, MeshGroups.from_world(full_mesh(plan)) under torchrun). init: the weight source of a model built
    on the meta device (materialize.py); the stage allocates and fills only its own shards."""

    def __init__(self, model: nn.Module, plan: Plan, graph: Graph | None = None, *, groups: MeshGroups,
                 init: materialize.WeightSource | None = None):
        if groups.mesh != full_mesh(plan):
            raise PlanError(f"plan.mesh: the pipeline needs groups of {full_mesh(plan)}, got {groups.mesh}")
        graph = graph if graph is not None else trace(model)
        plan.validate(graph)
        ops, self.crossing = stage_ops(graph, plan)
        check_untied(model, graph, ops)
        self.plan, self.pp = plan, groups.axes[PP_AXIS]
        self.stage, self.stages = self.pp.index, plan.pipeline.stages
        inner = MeshGroups(plan.mesh, groups.rank, {n: groups.axes[n] for n in plan.mesh.names}, groups.device,
                           groups.backend, groups.world_mesh)
        self.model = ParallelModel(model, plan, graph, groups=inner, stage=ops[self.stage], init=init)
        self.comm_stats = self.model.comm_stats
        self.trace: list[tuple[str, int, float, float]] = []  # (F|B, micro-batch, start, end) on this rank

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def parameters(self):
        return self.model.parameters()

    def reduce_gradients(self) -> None:
        self.model.reduce_gradients()

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Full gradients of this stage's parameters (collective within the stage's mesh)."""
        return self.model.full_grads()

    # ---- one training step -----------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor, targets: torch.Tensor, local: bool = False,
             microbatches: int | None = None) -> float:
        """Forward and backward of one step's batch in micro-batches (default plan.pipeline.microbatches);
        returns the mean loss over the global batch on every rank (gradients accumulate: call reduce_gradients,
        then the optimizer). tokens, targets: the global batch, or with local=True this rank's shard of it."""
        m = microbatches or self.plan.pipeline.microbatches
        if tokens.shape[0] % m:
            raise PlanError(f"plan.pipeline.microbatches: {m} does not divide this rank's batch of "
                            f"{tokens.shape[0]} sequences")
        xs, ys = tokens.chunk(m), targets.chunk(m)
        pm = self.model
        pm._token_placement = pm.input_placement() if local else pm._replicated()
        batch, seq = _global(tokens.shape, pm, local)
        self._tokens = batch * seq
        self._pending, self._held, self._t0 = [], {}, time.perf_counter()
        self._loss = torch.zeros((), dtype=torch.float64)
        for kind, i in schedule_order(self.plan.pipeline.schedule, self.stage, self.stages, m):
            if kind == "F":
                self._forward(i, xs[i], ys[i], local)
            else:
                self._backward(i)
        for work in self._pending:
            work.wait()
        total = all_reduce(self._loss.float().reshape(1), Channel(self.pp, "loss", "pp", stats=self.comm_stats))
        return float(total[0])

    def _forward(self, i: int, tokens: torch.Tensor, targets: torch.Tensor, local: bool) -> None:
        start = time.perf_counter()
        received = {} if self.first else self._recv_all(self.crossing[self.stage - 1], i, FWD)
        out, placement = self.model._run_graph(tokens, local, env=received)
        if self.last:
            pm = self.model
            y = align_targets(targets.to(pm.groups.device), pm._token_placement, placement, pm.axes, pm.comm_stats)
            loss = cross_entropy(out, placement, y, pm.axes, self._tokens, root=pm.groups.is_root,
                                 stats=pm.comm_stats)
            self._loss += loss.detach().double()
            self._held[i] = (received, [loss], None)
        else:
            sent = [out[n] for n in self.crossing[self.stage]]
            self._send_all(sent, i, FWD)
            self._held[i] = (received, sent, None)
        self.trace.append(("F", i, start - self._t0, time.perf_counter() - self._t0))

    def _backward(self, i: int) -> None:
        start = time.perf_counter()
        received, outputs, _ = self._held.pop(i)
        if self.last:
            outputs[0].backward()
        else:
            grads = self._recv_all(self.crossing[self.stage], i, BWD)
            pairs = [(t, grads[n]) for t, n in zip(outputs, self.crossing[self.stage]) if t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        if not self.first:
            names = self.crossing[self.stage - 1]
            self._send_all([received[n].grad if received[n].grad is not None else torch.zeros_like(received[n])
                            for n in names], i, BWD)
        self.trace.append(("B", i, start - self._t0, time.perf_counter() - self._t0))

    # ---- point-to-point between the same coordinate of neighbouring stages --------------------------------
    def _tag(self, i: int, phase: str, k: int, data: bool) -> int:
        return ((i * 2 + (phase == BWD)) * 256 + k) * 2 + data

    def _send_all(self, tensors: list[torch.Tensor], i: int, phase: str) -> None:
        peer = self.stage + (1 if phase == FWD else -1)
        ch = Channel(self.pp, "pipeline", "p2p", stats=self.comm_stats)
        for k, t in enumerate(tensors):
            t = t.detach().contiguous()
            if t.dtype not in _DTYPES or t.dim() > _HEADER - 2:
                raise NotImplementedError(f"pipeline: cannot send a {t.dtype} tensor of shape {tuple(t.shape)}")
            header = torch.tensor([t.dim(), _DTYPES.index(t.dtype), *t.shape, *[0] * (_HEADER - 2 - t.dim())])
            self._pending.append(self.pp.pg.send([header], peer, self._tag(i, phase, k, False)))
            self._pending.append(self.pp.pg.send([t], peer, self._tag(i, phase, k, True)))
            self._pending.append(_Keep(header, t))
            ch.record("send", phase, t.nbytes)

    def _recv_all(self, names: list[str], i: int, phase: str) -> dict[str, torch.Tensor]:
        peer = self.stage - (1 if phase == FWD else -1)
        out = {}
        for k, name in enumerate(names):
            header = torch.empty(_HEADER, dtype=torch.long)
            self.pp.pg.recv([header], peer, self._tag(i, phase, k, False)).wait()
            ndim, code = int(header[0]), int(header[1])
            t = torch.empty([int(s) for s in header[2:2 + ndim]], dtype=_DTYPES[code])
            self.pp.pg.recv([t], peer, self._tag(i, phase, k, True)).wait()
            t = t.to(self.model.groups.device)
            out[name] = t.requires_grad_(phase == FWD and t.is_floating_point())
        return out


def schedule_order(schedule: str, stage: int, stages: int, m: int) -> list[tuple[str, int]]:
    """The ("F"|"B", micro-batch) events stage `stage` runs, in order: GPipe all forwards then all backwards;
    1F1B min(stages - stage - 1, m) warm-up forwards, then one forward and one backward in turn, then the rest."""
    warmup = m if schedule == "gpipe" else min(stages - stage - 1, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(m - warmup, m)]


def bubble_fraction(orders: list[list[tuple[str, int]]], t_f: float = 1.0, t_b: float = 2.0) -> float:
    """The idle fraction of the step that the stages' recorded event orders imply (orders[s]: stage s's
    ("F"|"B", micro-batch) in the order it ran them, e.g. from PipelineRunner.trace), replayed with a forward
    taking t_f and a backward t_b on every stage: the schedule's bubble, free of this machine's timing noise.
    Compare with the planner's (pp - 1) / (m + pp - 1) (docs/reference.md, "Pipeline schedules")."""
    pp, done, pos, clock = len(orders), {}, [0] * len(orders), [0.0] * len(orders)
    while any(pos[s] < len(orders[s]) for s in range(pp)):
        progressed = False
        for s in range(pp):
            if pos[s] == len(orders[s]):
                continue
            kind, i = orders[s][pos[s]]
            deps = [("F", s - 1, i)] if kind == "F" and s > 0 else []
            deps += [("F", s, i)] + ([("B", s + 1, i)] if s < pp - 1 else []) if kind == "B" else []
            if all(d in done for d in deps):
                start = max([clock[s]] + [done[d] for d in deps])
                clock[s] = done[(kind, s, i)] = start + (t_f if kind == "F" else t_b)
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline: the recorded orders deadlock at positions {pos}")
    busy = max(sum(t_f if k == "F" else t_b for k, _ in order) for order in orders)
    return 1.0 - busy / max(clock)


class _Keep:
    """Holds a sent buffer alive until the step's end (gloo reads it asynchronously)."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def wait(self) -> None:
        self.tensors = ()


def _global(shape, pm: ParallelModel, local: bool) -> tuple[int, int]:
    return global_sizes(shape, pm._token_placement, pm.axes) if local else (int(shape[0]), int(shape[1]))
