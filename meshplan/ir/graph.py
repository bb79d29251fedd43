"""The IR: a networkx DiGraph of ops whose tensors have sympy shapes over batch (B) and sequence (S) symbols.

One IR serves every batch size and sequence length: FLOPs and shapes are sympy expressions, evaluated with
`graph.evaluate(expr, batch=..., seq=...)`. This module is the contract between the stages; it imports nothing
from planner, codegen, runtime or rl.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx
import sympy
import torch

B, S = sympy.symbols("B S", positive=True, integer=True)
N = sympy.Symbol("n", positive=True, integer=True)  # size of an op's model axis (strategies, cost model)

# Op kinds. Leaf kinds carry their block's hyperparameters in Op.attrs; "generic" is any other traced call
# (residual adds, elementwise), "input"/"output" are the graph's boundary.
INPUT, OUTPUT, GENERIC = "input", "output", "generic"
EMBEDDING, NORM, ATTENTION, MOE, FFN = "embedding", "norm", "attention", "moe", "ffn"
LINEAR, LM_HEAD = "linear", "lm_head"
OP_KINDS = (INPUT, OUTPUT, GENERIC, EMBEDDING, NORM, ATTENTION, MOE, FFN, LINEAR, LM_HEAD)

_LAYER = re.compile(r"(^|\.)(\d+)(\.|$)")


def dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[sympy.Expr, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32", "int64"

    @property
    def numel(self) -> sympy.Expr:
        return sympy.Mul(*self.shape) if self.shape else sympy.Integer(1)

    @property
    def nbytes(self) -> sympy.Expr:
        return self.numel * dtype_size(self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass
class Op:
    name: str  # unique: the module path for leaf ops ("layers.0.attention"), the fx node name otherwise
    kind: str
    inputs: list[str]  # producer op names, in argument order (one entry per tensor argument)
    input_metas: list[TensorMeta]
    output: TensorMeta | None
    attrs: dict[str, Any] = field(default_factory=dict)  # hyperparameters (leaf ops) / call target (generic)
    flops: sympy.Expr = sympy.Integer(0)  # forward FLOPs
    params: int = 0  # parameter count held by this op
    param_dtype: str = "float32"
    active_params: int = 0  # parameters one token touches (MoE: router + top-k experts + shared)
    node: str = ""  # the torch.fx node this op lowers (the runtime calls back into it for generic ops)
    # Soundness facts (locality.py): data parallelism is exact only for batch-wise ops, sequence sharding ("seq")
    # only for token-wise ones; `strategies` is the subset of the kind's strategies the runtime executes for this
    # op's module (None: all of them); `shape_only` lists the inputs the op reads only for their (local) shape.
    batch_wise: bool = False
    token_wise: bool = False
    strategies: tuple[str, ...] | None = None
    shape_only: tuple[int, ...] = ()
    param_inputs: tuple[int, ...] = ()  # inputs that are parameters/buffers read in forward: handed over whole
    why: str = ""  # what makes it batch- or sequence-mixing, for error messages
    # parameter name relative to the op's module -> shape (what strategies' layouts split; filled at trace time)
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def layer(self) -> int | None:
        """The transformer layer index, read from the module path ("layers.3.attention" -> 3)."""
        m = _LAYER.search(self.name)
        return int(m.group(2)) if m else None

    @property
    def template(self) -> str:
        """The name with layer indices replaced by '*': ops of identical layers share it (and ILP variables)."""
        return _LAYER.sub(lambda m: f"{m.group(1)}*{m.group(3)}", self.name)

    @property
    def param_bytes(self) -> int:
        return self.params * dtype_size(self.param_dtype)

    @property
    def is_leaf(self) -> bool:
        return self.kind not in (INPUT, OUTPUT, GENERIC)


class Graph:
    """Ops in a DiGraph (edges producer -> consumer, attribute `index`: the consumer's argument position)."""

    def __init__(self, name: str = "model"):
        self.name = name
        self.g = nx.DiGraph()
        self.module: torch.fx.GraphModule | None = None  # the traced module (not part of the IR proper)
        self.symbols: dict[str, sympy.Symbol] = {"B": B, "S": S}
        self.node_ops: dict[str, str] = {}  # fx node name -> the op whose value it is (the runtime's lookup)

    # ---- construction -----------------------------------------------------------------------------
    def add_op(self, op: Op) -> Op:
        if op.name in self.g:
            raise ValueError(f"duplicate op name {op.name!r}")
        if op.kind not in OP_KINDS:
            raise ValueError(f"op {op.name!r}: unknown kind {op.kind!r} (known: {OP_KINDS})")
        self.g.add_node(op.name, op=op)
        for i, src in enumerate(op.inputs):
            if src not in self.g:
                raise ValueError(f"op {op.name!r}: input {src!r} is not defined before it")
            if self.g.has_edge(src, op.name):
                self.g.edges[src, op.name]["indices"].append(i)
            else:
                self.g.add_edge(src, op.name, indices=[i])
        return op

    # ---- queries ----------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.g

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def op(self, name: str) -> Op:
        if name not in self.g:
            raise KeyError(f"no op named {name!r}")
        return self.g.nodes[name]["op"]

    def ops(self, kind: str | None = None) -> Iterator[Op]:
        """Ops in a deterministic topological order (ties broken by insertion order)."""
        order = {n: i for i, n in enumerate(self.g.nodes)}
        for name in nx.lexicographical_topological_sort(self.g, key=order.__getitem__):
            op = self.g.nodes[name]["op"]
            if kind is None or op.kind == kind:
                yield op

    def consumers(self, name: str) -> list[str]:
        return list(self.g.successors(name))

    def edges(self) -> Iterator[tuple[Op, Op]]:
        for u, v in self.g.edges:
            yield self.op(u), self.op(v)

    def templates(self) -> dict[str, list[Op]]:
        """Ops grouped by template: identical transformer layers collapse to one entry each."""
        out: dict[str, list[Op]] = {}
        for op in self.ops():
            out.setdefault(op.template, []).append(op)
        return out

    # ---- totals -----------------------------------------------------------------------------------
    @property
    def total_flops(self) -> sympy.Expr:
        return sympy.expand(sum((op.flops for op in self.ops()), sympy.Integer(0)))

    @property
    def total_params(self) -> int:
        return sum(op.params for op in self.ops())

    @property
    def active_params(self) -> int:
        return sum(op.active_params for op in self.ops())

    def evaluate(self, expr: sympy.Expr | int, batch: int, seq: int) -> int | float:
        v = sympy.sympify(expr).subs({B: batch, S: seq})
        return int(v) if v.is_integer else float(v)

    def n_layers(self) -> int:
        layers = {op.layer for op in self.ops() if op.layer is not None}
        return len(layers)

    def summary(self) -> str:
        return (f"{self.name}: {len(self)} ops, {self.n_layers()} layers, {human(self.total_params)} params, "
                f"{human(self.active_params)} active per token")


def human(n: float) -> str:
    """1234567 -> '1.23M' (for tables)."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if not float(n).is_integer() else str(int(n))


def prod(xs) -> sympy.Expr:
    return sympy.Mul(*xs) if xs else sympy.Integer(1)


def numel(shape) -> int:
    return math.prod(int(d) for d in shape)
