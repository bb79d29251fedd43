"""Frontend: torch.fx tracing of an nn.Module into the IR.

Registered blocks (attention, MoE, FFN, norm, embedding, linear, LM head; see ops.py) stay whole as leaf ops; the
rest (residual adds, elementwise) lowers to generic ops. Shapes are symbolic: the inputs are fake tensors whose
batch and sequence sizes are torch SymInts, so every generic op's output shape comes out of torch's own shape
propagation as a sympy expression, which we rewrite over the IR's B and S symbols. meshplan's own leaf blocks are
never executed (the 352B configs live on the meta device): their spec gives the output shape.

Edges are kept exactly: a node that yields no tensor (a size, a tuple from `split`) is no op, and whoever reads
it gets the tensors it was computed from as inputs — as data, or, for a size read, as a *shape-only* input (the
runtime hands the op a stand-in of the local shape, no data moves). Every op is classified batch-/token-wise
(locality.py), so the planner only shards what stays exact.
"""
from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn as nn

from . import graph as G
from . import locality as L
from .graph import Graph, Op, TensorMeta
from .ops import LeafSpec, leaf_facts, leaf_spec

# Hints for the symbolic sizes where the example's own are 0 or 1 (torch specialises those). The example's sizes
# are the hints otherwise: a model whose positions stop at max_seq_len must see a length it accepts.
_HINTS = {"B": 3, "S": 17}


class TraceError(RuntimeError):
    """A module could not be traced; the message names it and how to make it a leaf."""


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True  # `self.mask[:t]` in forward is a node, not a constant
        self.path: list[str] = []  # module path stack, for error messages

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return leaf_spec(m) is not None or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.path.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the module named
            raise TraceError(
                f"cannot trace module {qualname!r} ({type(m).__name__}): {type(e).__name__}: {e}. "
                f"If it is a self-contained block, register it as a leaf: "
                f"meshplan.ir.register_leaf({type(m).__name__}, kind='generic', token_wise=..., batch_wise=...)"
            ) from e
        finally:
            self.path.pop()


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TraceError(f"cannot trace {type(model).__name__}: {type(e).__name__}: {e}") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def trace(model: nn.Module, example_inputs: tuple | None = None, name: str | None = None) -> Graph:
    """Trace `model` into the IR. example_inputs fix the inputs' ranks and dtypes (default: int64 tokens [B, S]);
    their sizes are replaced by symbols (dims 0 and 1 are B and S)."""
    gm = symbolic_trace(model)
    state = _Lowering(gm, name or getattr(getattr(model, "config", None), "name", type(model).__name__))
    state.make_inputs(example_inputs if example_inputs is not None else (torch.zeros(2, 8, dtype=torch.long),))
    with state.fake_mode:
        for node in gm.graph.nodes:
            state.lower(node)
            state.check_specialisation(node)
    return state.graph


class _Lowering:
    """One trace: fake values per fx node, the op (or the ops a non-tensor value came from) behind each node."""

    def __init__(self, gm: fx.GraphModule, name: str):
        # Imported here, not at module load: torch._dynamo costs seconds, and every runtime rank imports the IR.
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self.gm = gm
        self.shape_env = ShapeEnv(duck_shape=False)
        self.fake_mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.graph = Graph(name)
        self.graph.module = gm
        self.modules = dict(gm.named_modules())
        self.to_ir: dict[sympy.Symbol, sympy.Symbol] = {}
        self.env: dict[str, Any] = {}  # fx node name -> fake value
        self.op_of: dict[str, str] = {}  # fx node name -> the op whose value it is
        self.graph.node_ops = self.op_of
        self.sources: dict[str, tuple[list[str], list[str], L.Locality]] = {}  # non-tensor node -> data, shape
        self.local_count: dict[str, int] = {}
        self.fake_inputs: dict[str, tuple[torch.Tensor, int]] = {}

    # ---- values and metas -----------------------------------------------------------------------------------
    def sym(self, d) -> sympy.Expr:
        e = d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d))
        return sympy.sympify(e).xreplace(self.to_ir)

    def meta_of(self, v) -> TensorMeta | None:
        if isinstance(v, torch.Tensor):
            return TensorMeta(tuple(self.sym(d) for d in v.shape), _dtype_name(v.dtype))
        return None

    def make_inputs(self, example_inputs: tuple) -> None:
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(example_inputs) != len(placeholders):
            raise TraceError(f"example_inputs: {len(example_inputs)} given, the model takes {len(placeholders)}")
        for node, example in zip(placeholders, example_inputs):
            n_sym = min(2, example.dim())  # dims 0 and 1 are B and S; the rest keep the example's sizes
            hints = [d if d >= 2 else _HINTS[k] for d, k in zip(example.shape[:n_sym], ("B", "S"))]
            real = torch.zeros(hints + list(example.shape[n_sym:]), dtype=example.dtype)
            ctx = StatelessSymbolicContext(
                dynamic_sizes=[DimDynamic.DYNAMIC] * n_sym + [DimDynamic.STATIC] * (real.dim() - n_sym))
            fake = self.fake_mode.from_tensor(real, symbolic_context=ctx, source=ConstantSource(node.name))
            self.fake_inputs[node.name] = fake, n_sym

    def static_fake(self, value: torch.Tensor, target: str) -> torch.Tensor:
        """A parameter or buffer as a fake tensor of its own, static shape (never a fresh size symbol)."""
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

        ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC] * value.dim())
        return self.fake_mode.from_tensor(value, symbolic_context=ctx, source=ConstantSource(f"attr_{target}"))

    def check_specialisation(self, node: fx.Node) -> None:
        """A forward that turns B or S into a Python number (math.sqrt(x.size(1)), int(...), a branch on the
        length) has been traced for one size only: refuse it, naming the node."""
        for expr in self.to_ir:
            if self.shape_env.replacements.get(expr, expr).is_number:
                which = "sequence length" if self.to_ir[expr] == G.S else "batch size"
                raise TraceError(f"{node.format_node()}: the forward turns the {which} into a constant (a Python "
                                 f"number or branch computed from a tensor size), so the trace would hold for one "
                                 f"{which} only; compute it with torch ops, or register the block as a leaf")

    # ---- sources --------------------------------------------------------------------------------------------
    def node_sources(self, node: fx.Node) -> tuple[list[str], list[str], L.Locality]:
        """(ops read as data, ops read only for their shape, locality of the non-tensor nodes read through)."""
        data: list[str] = []
        shape: list[str] = []
        loc = L.BOTH
        meta_read = L.is_meta_read(node)

        def visit(n: fx.Node):
            nonlocal loc
            if n.name in self.op_of:
                (shape if meta_read else data).append(self.op_of[n.name])
            elif n.name in self.sources:
                d, s, lo = self.sources[n.name]
                (shape if meta_read else data).extend(d)
                shape.extend(s)
                loc = loc & lo
        fx.node.map_arg((node.args, node.kwargs), visit)
        data = list(dict.fromkeys(data))
        shape = [s for s in dict.fromkeys(shape) if s not in data]
        return data, shape, loc

    # ---- lowering -------------------------------------------------------------------------------------------
    def lower(self, node: fx.Node) -> None:
        if node.name in self.op_of:  # an element of a module's tuple, already the module's op
            return
        if node.op == "placeholder":
            self.lower_input(node)
        elif node.op == "output":
            data, _, _ = self.node_sources(node)
            ins = [self.graph.op(o) for o in data]
            self.graph.add_op(Op("return", G.OUTPUT, data, [o.output for o in ins], None, node=node.name))
        elif node.op == "get_attr":
            val = _fetch_attr(self.gm, node.target)
            if isinstance(val, torch.Tensor):
                val = self.static_fake(val, node.target)
                self.graph.add_op(Op(node.name, G.INPUT, [], [], self.meta_of(val), {"param": node.target},
                                     node=node.name, batch_wise=True, token_wise=True))
                self.op_of[node.name] = node.name
            else:
                self.sources[node.name] = ([], [], L.BOTH)
            self.env[node.name] = val
        elif node.op == "call_module" and (facts := leaf_facts(self.modules[node.target])) is not None \
                and facts[0].kind != G.GENERIC:
            self.lower_leaf(node, *facts)
        else:
            self.lower_generic(node)

    def lower_input(self, node: fx.Node) -> None:
        fake, n_sym = self.fake_inputs[node.name]
        for d, ir_name in zip(fake.shape[:n_sym], ("B", "S")):
            s = self.graph.symbols.setdefault(ir_name, sympy.Symbol(ir_name, positive=True, integer=True))
            self.to_ir[d.node.expr] = s
        self.env[node.name] = fake
        self.op_of[node.name] = node.name
        self.graph.add_op(Op(node.name, G.INPUT, [], [], self.meta_of(fake), node=node.name,
                             batch_wise=True, token_wise=True))

    def lower_leaf(self, node: fx.Node, spec: LeafSpec, exact: bool) -> None:
        module = self.modules[node.target]
        data, shape_only, _ = self.node_sources(node)
        inputs = data + shape_only
        in_metas = [self.graph.op(o).output for o in inputs]
        attrs = spec.attrs(module)
        out = None
        if not (spec.builtin and exact):  # a user's block: its real output, not an assumed one
            out = self.run_user_leaf(node, module)
        if out is None:
            shape = spec.out_shape(attrs, [m.shape for m in in_metas])
            dtype = spec.out_dtype(module, [m.dtype for m in in_metas]) if spec.out_dtype else in_metas[0].dtype
            out = TensorMeta(tuple(sympy.sympify(d) for d in shape), dtype)
            rev = {v: k for k, v in self.to_ir.items()}
            # A fake stand-in with the same symbolic shape lets later generic ops propagate shapes.
            self.env[node.name] = torch.empty([_symint(self.shape_env, d, rev) for d in out.shape],
                                              dtype=getattr(torch, out.dtype))
        params = sum(p.numel() for p in module.parameters())
        pdtype = next((_dtype_name(p.dtype) for p in module.parameters()), "float32")
        active = spec.active_params(attrs, params) if spec.active_params else params
        strategies = spec.strategies_for(module) if exact else ("replicate",)
        token_wise = spec.is_token_wise(module) if exact else False
        op = Op(node.target, spec.kind, inputs, in_metas, out, attrs, spec.flops(attrs, [m.shape for m in in_metas]),
                params, pdtype, active, node.name, batch_wise=spec.batch_wise, token_wise=token_wise,
                param_shapes={name: tuple(p.shape) for name, p in module.named_parameters()},
                strategies=strategies, shape_only=tuple(range(len(data), len(inputs))),
                why="" if exact else f"{type(module).__name__} overrides the registered class's forward")
        self.add(node, op)

    def run_user_leaf(self, node: fx.Node, module: nn.Module) -> TensorMeta | None:
        """Shape-propagate a user-registered block; None when its code cannot run on fake tensors."""
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.env[n.name])
        try:
            val = module(*args, **kwargs)
        except Exception:  # noqa: BLE001 - data-dependent code: fall back to the declared output shape
            return None
        if not isinstance(val, torch.Tensor):
            raise TraceError(f"leaf {node.target!r} ({type(module).__name__}) returns {type(val).__name__}, not "
                             f"one tensor; a leaf of kind other than 'generic' must return one tensor")
        self.env[node.name] = val
        return self.meta_of(val)

    def lower_generic(self, node: fx.Node) -> None:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.env[n.name])
        try:
            val = self.evaluate(node, args, kwargs)
        except Exception as e:  # noqa: BLE001
            raise TraceError(f"cannot propagate shapes through {node.format_node()}: "
                             f"{type(e).__name__}: {e}") from e
        self.env[node.name] = val
        data, shape_only, through = self.node_sources(node)
        outs = [self.meta_of(v) for v in _tensors(val)]
        spec = leaf_spec(module) if module is not None else None
        if spec is not None:  # a registered generic leaf: its declared locality
            loc = L.Locality(spec.batch_wise, spec.token_wise is True, f"{type(module).__name__} (declared)")
        elif not outs or L.is_meta_read(node):
            loc = L.BOTH  # sizes and their arithmetic: judged where they enter a tensor's values
        else:
            ops = [self.graph.op(o) for o in data]
            in_metas = [o.output for o in ops]
            moved = [o.output for o in ops if o.attrs.get("param") is None] + outs  # what placements shard
            loc = L.classify(node, args, kwargs, in_metas, moved, module) & through
        if not isinstance(val, torch.Tensor):
            if module is not None and outs:
                self.lower_module_tuple(node, module, val, data, shape_only, loc)
            else:  # a size, a tuple of views: no op; readers take its sources
                self.sources[node.name] = (data, shape_only, loc)
            return
        self.add(node, self.generic_op(node, data, shape_only, self.meta_of(val), loc, module))

    def lower_module_tuple(self, node, module, val, data, shape_only, loc) -> None:
        """A module returning a tuple (nn.MultiheadAttention's (out, weights)) is one op whose value is the one
        element its readers take; readers of two different elements are refused."""
        users = list(node.users)
        getitems = [u for u in users if u.op == "call_function" and u.target is operator.getitem]
        idx = {u.args[1] for u in getitems}
        if len(idx) != 1 or len(users) != len(getitems):
            raise TraceError(f"module {node.target!r} ({type(module).__name__}) returns a tuple whose elements "
                             f"{sorted(map(str, idx)) or 'as a whole'} are used; meshplan runs modules that yield "
                             f"one tensor (register a wrapper that returns one tensor)")
        k = idx.pop()
        op = self.generic_op(node, data, shape_only, self.meta_of(val[k]), loc, module)
        op.attrs["tuple_index"] = k
        self.add(node, op)
        for u in users:
            self.op_of[u.name] = op.name
            self.env[u.name] = val[k]

    def generic_op(self, node, data, shape_only, out, loc, module) -> Op:
        inputs = data + shape_only
        params = sum(p.numel() for p in module.parameters()) if module is not None else 0
        flops = out.numel if node.op != "call_module" else sympy.Integer(0)
        target = node.target if isinstance(node.target, str) else node.target.__name__
        return Op(self.generic_name(node), G.GENERIC, inputs, [self.graph.op(o).output for o in inputs], out,
                  {"target": target, "call": node.op}, flops, params, "float32", params, node.name,
                  batch_wise=loc.batch_wise, token_wise=loc.token_wise,
                  strategies=None if module is None or leaf_spec(module) is None else ("replicate", "seq"),
                  shape_only=tuple(range(len(data), len(inputs))), why=loc.why,
                  param_shapes={} if module is None else {n: tuple(p.shape) for n, p in module.named_parameters()},
                  param_inputs=tuple(i for i, o in enumerate(inputs) if "param" in self.graph.op(o).attrs))

    def evaluate(self, node: fx.Node, args, kwargs):
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.modules[node.target](*args, **kwargs)

    def add(self, node: fx.Node, op: Op) -> None:
        self.op_of[node.name] = op.name
        self.graph.add_op(op)

    def generic_name(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        scope = next(reversed(stack.values()))[0] if stack else ""
        if node.op == "call_module":
            key = str(node.target)
        else:
            base = node.target.__name__ if callable(node.target) else str(node.target)
            key = f"{scope}.{base}" if scope else base
        n = self.local_count.get(key, 0)
        self.local_count[key] = n + 1
        return key if n == 0 else f"{key}_{n}"


def _tensors(val) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in _tensors(v)]
    return []


def _symint(shape_env, d: sympy.Expr, rev: dict):
    """An IR dimension expression -> a SymInt the fake tensors understand (an int when it is constant)."""
    d = sympy.sympify(d)
    if d.is_Integer:
        return int(d)
    expr = d.xreplace(rev)
    hint_of = getattr(shape_env, "optimization_hint", None) or shape_env.size_hint
    return shape_env.create_symintnode(expr, hint=int(hint_of(expr)))


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
