"""Frontend: torch.fx tracing of an nn.Module into the IR.

Registered blocks (attention, MoE, FFN, norm, embedding, linear, LM head; see ops.py) stay whole as leaf ops; the
rest (residual adds, elementwise) lowers to generic ops. Shapes are symbolic: the inputs are fake tensors whose
batch and sequence sizes are torch SymInts, so every generic op's output shape comes out of torch's own shape
propagation as a sympy expression, which we rewrite over the IR's B and S symbols. Leaf ops are never executed
(the 352B configs live on the meta device): their spec gives the output shape.
"""
from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn as nn

from . import graph as G
from .graph import Graph, Op, TensorMeta
from .ops import leaf_spec

# Hints for the symbolic sizes: distinct, and not 0/1 (torch specialises those).
_HINTS = {"B": 3, "S": 17}


class TraceError(RuntimeError):
    """A module could not be traced; the message names it and how to make it a leaf."""


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__()
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
                f"meshplan.ir.register_leaf({type(m).__name__}, kind='generic' | 'ffn' | ...)"
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
    # Imported here, not at module load: torch._dynamo costs seconds, and every runtime rank imports the IR.
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    gm = symbolic_trace(model)
    if example_inputs is None:
        example_inputs = (torch.zeros(2, 8, dtype=torch.long),)
    shape_env = ShapeEnv(duck_shape=False)
    fake_mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    graph = Graph(name or getattr(getattr(model, "config", None), "name", type(model).__name__))
    graph.module = gm
    modules = dict(gm.named_modules())

    to_ir: dict[sympy.Symbol, sympy.Symbol] = {}
    env: dict[str, Any] = {}  # fx node name -> fake value
    op_of: dict[str, str] = {}  # fx node name -> IR op name producing it
    local_count: dict[str, int] = {}

    def sym(d) -> sympy.Expr:
        e = d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d))
        return sympy.sympify(e).xreplace(to_ir)

    def meta_of(v) -> TensorMeta | None:
        if isinstance(v, torch.Tensor):
            return TensorMeta(tuple(sym(d) for d in v.shape), _dtype_name(v.dtype))
        return None

    def tensor_inputs(node: fx.Node) -> list[fx.Node]:
        seen: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: seen.append(n) if n not in seen else None)
        return [n for n in seen if isinstance(env.get(n.name), torch.Tensor)]

    def generic_name(node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        scope = next(reversed(stack.values()))[0] if stack else ""
        base = node.target.__name__ if callable(node.target) else str(node.target)
        key = f"{scope}.{base}" if scope else base
        n = local_count.get(key, 0)
        local_count[key] = n + 1
        return key if n == 0 else f"{key}_{n}"

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) != len(placeholders):
        raise TraceError(f"example_inputs: {len(example_inputs)} given, the model takes {len(placeholders)}")

    fake_inputs = {}
    for node, example in zip(placeholders, example_inputs):
        n_sym = min(2, example.dim())  # dims 0 and 1 are B and S; the rest keep the example's sizes
        real = torch.zeros([_HINTS["B"], _HINTS["S"]][:n_sym] + list(example.shape[n_sym:]), dtype=example.dtype)
        fake_inputs[node.name] = fake_mode.from_tensor(real, symbolic_context=StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC] * n_sym + [DimDynamic.STATIC] * (real.dim() - n_sym)),
            source=ConstantSource(node.name)), n_sym

    with fake_mode:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                fake, n_sym = fake_inputs[node.name]
                for d, ir_name in zip(fake.shape[:n_sym], ("B", "S")):
                    s = graph.symbols.setdefault(ir_name, sympy.Symbol(ir_name, positive=True, integer=True))
                    to_ir[d.node.expr] = s
                env[node.name] = fake
                op_of[node.name] = node.name
                graph.add_op(Op(node.name, G.INPUT, [], [], meta_of(fake), node=node.name))
                continue
            if node.op == "output":
                ins = tensor_inputs(node)
                graph.add_op(Op("return", G.OUTPUT, [op_of[n.name] for n in ins],
                                [meta_of(env[n.name]) for n in ins], None, node=node.name))
                continue

            ins = tensor_inputs(node)
            in_metas = [meta_of(env[n.name]) for n in ins]
            module = modules.get(node.target) if node.op == "call_module" else None
            spec = leaf_spec(module) if module is not None else None
            if spec is not None:
                attrs = spec.attrs(module)
                shape = spec.out_shape(attrs, [m.shape for m in in_metas])
                dtype = spec.out_dtype(module, [m.dtype for m in in_metas]) if spec.out_dtype else in_metas[0].dtype
                params = sum(p.numel() for p in module.parameters())
                pdtype = next((_dtype_name(p.dtype) for p in module.parameters()), "float32")
                active = spec.active_params(attrs, params) if spec.active_params else params
                out = TensorMeta(tuple(sympy.sympify(d) for d in shape), dtype)
                # A fake stand-in with the same symbolic shape lets later generic ops propagate shapes.
                rev = {v: k for k, v in to_ir.items()}
                env[node.name] = torch.empty([_symint(shape_env, d, rev) for d in shape],
                                             dtype=getattr(torch, dtype))
                op = Op(node.target, spec.kind, [op_of[n.name] for n in ins], in_metas, out, attrs,
                        spec.flops(attrs, [m.shape for m in in_metas]), params, pdtype, active, node.name)
            else:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n.name])
                try:
                    if node.op == "call_function":
                        val = node.target(*args, **kwargs)
                    elif node.op == "call_method":
                        val = getattr(args[0], node.target)(*args[1:], **kwargs)
                    elif node.op == "call_module":
                        val = modules[node.target](*args, **kwargs)
                    else:  # get_attr
                        val = _fetch_attr(gm, node.target)
                        val = fake_mode.from_tensor(val) if isinstance(val, torch.Tensor) else val
                except Exception as e:  # noqa: BLE001
                    raise TraceError(f"cannot propagate shapes through {node.format_node()}: "
                                     f"{type(e).__name__}: {e}") from e
                env[node.name] = val
                out = meta_of(val)
                if node.op == "get_attr" or out is None:
                    op_of[node.name] = op_of[ins[0].name] if ins else node.name
                    if node.op == "get_attr":
                        op_of[node.name] = node.name
                        graph.add_op(Op(node.name, G.INPUT, [], [], out, {"param": node.target}, node=node.name))
                    continue
                flops = out.numel if node.op != "call_module" else sympy.Integer(0)
                params = sum(p.numel() for p in modules[node.target].parameters()) if node.op == "call_module" else 0
                op = Op(generic_name(node), G.GENERIC, [op_of[n.name] for n in ins], in_metas, out,
                        {"target": node.target if isinstance(node.target, str) else node.target.__name__,
                         "call": node.op}, flops, params, "float32", params, node.name)
            op_of[node.name] = op.name
            graph.add_op(op)
    return graph


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
