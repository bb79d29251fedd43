"""The task graph of one training step: a DAG of compute and communication tasks, forward and backward.

Each op becomes its phases (phases.py); each resharding edge of the plan (Plan.reshards: TP's all-gather before and
reduce-scatter after) becomes a communication task; the backward mirrors the forward in reverse (an all-to-all's
gradient is an all-to-all, an all-gather's a reduce-scatter) and adds each op's gradient reduction, which may
overlap the backward of earlier ops.

Chosen ops are split into c chunks along the batch so that one chunk's collective can run while another chunk
computes (docs/reference.md "Overlap"). Every op of the model treats samples independently, so a chunk of one chunked op
depends only on the same chunk of the next; an op left whole joins all chunks before it, and the loss (a mean over
the batch) joins all chunks between forward and backward.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..ir import graph as G
from ..ir.graph import Graph
from ..ir.placement import Shard
from ..ir.plan import Plan
from ..ir.strategies import PRECISION_BYTES, transition
from .phases import (
    COMM,
    COMPUTE,
    DDP_BUCKET_BYTES,
    MIRROR,
    OpView,
    Phase,
    grad_phases,
    op_phases,
)

FWD, BWD = "fwd", "bwd"


class TaskGraphError(ValueError):
    """The plan cannot be split as asked (e.g. the chunk count does not divide a rank's batch)."""


@dataclass(frozen=True)
class Task:
    """One unit of work on one stream. Numbers are per rank; `share` is the fraction of the op's batch it covers."""

    id: str  # "<direction>:<op>/<phase>[#chunk]", e.g. "fwd:layers.0.feed_forward/dispatch#1"
    op: str  # the op it belongs to (for a resharding edge: the consumer; phase "in<i>" is its input i)
    kind: str  # the op's kind (attention, moe, ...)
    phase: str
    direction: str  # FWD | BWD
    chunk: int | None  # None: the whole batch
    stream: str  # "compute" | "comm"
    deps: tuple[str, ...]
    share: float = 1.0
    flops: float = 0.0
    mem_bytes: float = 0.0
    collective: str | None = None
    nbytes: float = 0.0
    axes: tuple[str, ...] = ()
    group: int = 1
    gemm_dims: tuple[float, ...] = ()  # main GEMM (rows, inner, columns) of this task: a chunk has share of the rows

    def to_dict(self) -> dict:
        d = asdict(self)
        d["deps"], d["axes"], d["gemm_dims"] = list(self.deps), list(self.axes), list(self.gemm_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        d = dict(d)
        d["deps"], d["axes"] = tuple(d.get("deps", ())), tuple(d.get("axes", ()))
        d["gemm_dims"] = tuple(d.get("gemm_dims", ()))
        return cls(**d)


@dataclass
class TaskGraph:
    tasks: dict[str, Task]  # in a topological order (every task after its deps)
    meta: dict = field(default_factory=dict)  # model, mesh, batch, seq, chunks, chunk_kinds, grad_bucket_bytes

    def __iter__(self):
        return iter(self.tasks.values())

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, task_id: str) -> Task:
        return self.tasks[task_id]

    def successors(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {t: [] for t in self.tasks}
        for t in self.tasks.values():
            for d in t.deps:
                out[d].append(t.id)
        return out


@dataclass(eq=False)
class _Node:
    """A step of the forward graph: its forward and backward work (either may be nothing, e.g. a local slice)."""

    op: G.Op
    phase: str
    chunk: int | None
    share: float
    fwd: Phase | None
    bwd: Phase | None
    preds: list["_Node"] = field(default_factory=list)
    succs: list["_Node"] = field(default_factory=list)


def task_id(direction: str, op: str, phase: str, chunk: int | None) -> str:
    return f"{direction}:{op}/{phase}" + (f"#{chunk}" if chunk is not None else "")


def build_task_graph(graph: Graph, plan: Plan, batch: int, seq: int, chunks: int = 1,
                     chunk_kinds: set[str] | None = None, grad_bucket_bytes: float = DDP_BUCKET_BYTES) -> TaskGraph:
    """The tasks of one training step. `chunk_kinds`: op kinds split into `chunks` micro-batch chunks (None: all);
    `grad_bucket_bytes`: the largest gradient reduction issued as one collective."""
    plan.validate(graph, batch, seq)
    if chunks < 1:
        raise TaskGraphError(f"chunks: must be a positive integer, got {chunks}")
    b = _Builder(graph, plan, batch, seq, chunks, chunk_kinds, grad_bucket_bytes)
    for op in graph.ops():
        if op.name in plan.ops:
            b.add_op(op)
    meta = {"model": plan.model, "mesh": plan.mesh.to_dict(), "batch": batch, "seq": seq, "chunks": chunks,
            "chunk_kinds": "all" if chunk_kinds is None else sorted(chunk_kinds),
            "grad_bucket_bytes": grad_bucket_bytes}
    return TaskGraph(b.emit(), meta)


class _Builder:
    def __init__(self, graph, plan, batch, seq, chunks, chunk_kinds, bucket):
        self.graph, self.plan, self.batch, self.seq, self.bucket = graph, plan, batch, seq, bucket
        self.chunks, self.chunk_kinds = chunks, chunk_kinds
        self.nodes: list[_Node] = []  # creation order is a topological order of the forward
        self.groups: list[list[_Node]] = []  # the chunks of one (op, phase), in creation order
        self.out: dict[str, list[_Node]] = {}  # op -> the nodes producing its output (one per chunk, or one)
        self.grads: dict[str, list[Phase]] = {}

    # ---- forward structure ------------------------------------------------------------------------------------
    def add_op(self, op: G.Op) -> None:
        v = OpView(self.graph, self.plan, op, self.batch, self.seq)
        chunked = self._chunked(op, v)
        frontier = [self._input(op, i, src, chunked) for i, src in enumerate(op.inputs) if src in self.plan.ops]
        by_phase: dict[str, list[_Node]] = {}
        for ph in op_phases(v):
            nodes = self._copies(op, ph.name, chunked, ph, _backward(ph))
            for srcs in ([by_phase[a] for a in ph.after] if ph.after else frontier):
                _link(srcs, nodes)
            by_phase[ph.name] = nodes
        self.out[op.name] = nodes
        self.grads[op.name] = grad_phases(v, self.bucket)

    def _chunked(self, op: G.Op, v: OpView) -> bool:
        if self.chunks == 1 or (self.chunk_kinds is not None and op.kind not in self.chunk_kinds):
            return False
        split = [(a, s) for (a, s), pl in zip(self.plan.mesh.axes, v.p.input) if pl == Shard(0) and s > 1]
        local = self.batch
        for _, s in split:
            local //= s
        if local % self.chunks:
            over = " over " + ", ".join(f"{a}={s}" for a, s in split) if split else ""
            raise TaskGraphError(f"chunks: {self.chunks} chunks do not divide the per-rank batch {local} of op "
                                 f"{op.name!r} (batch {self.batch}{over}); use a batch divisible by "
                                 f"{self.chunks * (self.batch // local)}")
        return True

    def _copies(self, op, phase, chunked, fwd, bwd) -> list[_Node]:
        if chunked:
            nodes = [_Node(op, phase, c, 1.0 / self.chunks, fwd, bwd) for c in range(self.chunks)]
        else:
            nodes = [_Node(op, phase, None, 1.0, fwd, bwd)]
        self.nodes.extend(nodes)
        self.groups.append(nodes)
        return nodes

    def _input(self, op: G.Op, idx: int, src: str, chunked: bool) -> list[_Node]:
        """The nodes op's input `idx` waits for: the producer's output, through any resharding collectives."""
        mesh, p_src, p_dst = self.plan.mesh, self.plan.ops[src], self.plan.ops[op.name]
        nodes = self.out[src]
        differing = [i for i in range(len(mesh.axes)) if p_src.output[i] != p_dst.input[i]]
        for i in differing:
            axis, size = mesh.axes[i]
            try:
                coll = transition(p_src.output[i], p_dst.input[i])
            except ValueError as e:
                raise TaskGraphError(f"plan.ops[{op.name!r}].input[{i}]: from {src!r}: {e}") from None
            meta = self.graph.op(src).output
            nbytes = float(self.graph.evaluate(meta.numel, self.batch, self.seq))
            for j, ((_, s), pl) in enumerate(zip(mesh.axes, p_dst.input)):
                if j != i and isinstance(pl, Shard):
                    nbytes /= s  # the other axes' shards: this collective's group sees only its own slice
            prec = p_dst.precision.get(f"in{idx}")
            nbytes *= PRECISION_BYTES[prec] if prec else G.dtype_size(meta.dtype)
            comm = Phase(f"in{idx}" + (f".{axis}" if len(differing) > 1 else ""), COMM,
                         collective=coll, nbytes=nbytes, axes=(axis,), group=size)
            fwd = comm if coll not in ("none", "slice") else None  # a slice is local: no forward task
            edge = self._copies(op, comm.name, chunked or len(nodes) > 1, fwd, _backward(comm))
            _link(nodes, edge)
            nodes = edge
        return nodes

    # ---- tasks --------------------------------------------------------------------------------------------------
    def emit(self) -> dict[str, Task]:
        tasks: dict[str, Task] = {}
        fwd_ids: dict[int, str] = {}
        for n in self.nodes:
            if n.fwd is not None:
                fwd_ids[id(n)] = self._task(tasks, n, FWD, n.fwd, _resolve(n.preds, fwd_ids, "preds"))
        # The loss is a mean over the whole batch: every backward starts after every forward output is in.
        loss = [fwd_ids[id(n)] for n in self.nodes if not n.succs and id(n) in fwd_ids]
        bwd_ids: dict[int, str] = {}
        pending = {}  # op -> its backward compute tasks not yet emitted (its gradient reduction waits for all)
        for n in self.nodes:
            if n.bwd is not None and n.bwd.stream == COMPUTE:
                pending[n.op.name] = pending.get(n.op.name, 0) + 1
        done: dict[str, list[str]] = {}
        # Backward walks the forward in reverse, each phase's chunks in ascending order (they are independent).
        for n in (n for group in reversed(self.groups) for n in group):
            if n.bwd is None:
                continue
            deps = _resolve(n.succs, bwd_ids, "succs", loss) if n.succs else list(loss)
            bwd_ids[id(n)] = tid = self._task(tasks, n, BWD, n.bwd, deps)
            if n.bwd.stream == COMPUTE:
                done.setdefault(n.op.name, []).append(tid)
                pending[n.op.name] -= 1
                if pending[n.op.name] == 0:
                    for g in self.grads[n.op.name]:
                        whole = _Node(n.op, g.name, None, 1.0, None, g)
                        self._task(tasks, whole, BWD, g, done[n.op.name])
        return tasks

    def _task(self, tasks: dict, n: _Node, direction: str, ph: Phase, deps: list[str]) -> str:
        tid = task_id(direction, n.op.name, n.phase, n.chunk)
        tasks[tid] = Task(tid, n.op.name, n.op.kind, n.phase, direction, n.chunk, ph.stream, tuple(deps), n.share,
                          ph.flops * n.share, ph.mem_bytes * n.share, ph.collective, ph.nbytes * n.share,
                          ph.axes, ph.group,
                          (ph.gemm_dims[0] * n.share, *ph.gemm_dims[1:]) if ph.gemm_dims else ())
        return tid


def _backward(ph: Phase) -> Phase | None:
    if ph.stream == COMPUTE:
        # Backward computes the input gradient and the weight gradient: two GEMMs per forward GEMM.
        return replace(ph, flops=2 * ph.flops, mem_bytes=2 * ph.mem_bytes)
    mirror = MIRROR[ph.collective] if ph.grad else None
    return replace(ph, collective=mirror) if mirror else None


def _link(srcs: list[_Node], dsts: list[_Node]) -> None:
    """Chunk i feeds chunk i where both sides are chunked; otherwise every source feeds every destination."""
    pairs = zip(srcs, dsts) if len(srcs) == len(dsts) > 1 else ((s, d) for s in srcs for d in dsts)
    for s, d in pairs:
        d.preds.append(s)
        s.succs.append(d)


def _resolve(nodes: list[_Node], ids: dict[int, str], direction: str, at_end: list[str] = ()) -> list[str]:
    """The task ids these nodes stand for, looking through nodes with no task in this direction (a slice's forward,
    an all-reduce's backward) to their own neighbours; `at_end` for a path that runs out (the loss)."""
    out: list[str] = []
    stack = list(reversed(nodes))
    seen: set[int] = set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if id(n) in ids:
            out.append(ids[id(n)])
        else:
            nxt = getattr(n, direction)
            if nxt:
                stack.extend(reversed(nxt))
            else:
                out.extend(at_end)
    return list(dict.fromkeys(out))
