"""Which positions an op's output depends on: the fact that makes data and sequence parallelism exact.

An op is *batch-wise* when output sample b depends only on input sample b (and on batch-free tensors: weights,
positions, masks); then data parallelism — every rank runs the op on its own samples — computes exactly the
single-device result. It is *token-wise* when output position (b, s) depends only on input position (b, s);
then sequence sharding (`seq`: each rank holds a slice of the sequence, weights replicated) is exact.
Attention, SDPA, convolutions over time, cumsum, a reduction over the sequence, a mask built from the local
sequence length are sequence-mixing: they are never sequence-sharded by `seq` (Ulysses `sp` exists for attention).

Nothing is assumed: a generic op is batch-/token-wise only when proven from its fx target (an allow-list of
torch functions, methods and modules) and its symbolic shapes — the batch symbol B must sit in dim 0 and the
sequence symbol S in dim 1 of every tensor it reads and writes, the dims it reduces, splits, concatenates or
indexes must be other dims, and no number it computes with may be derived from the (local) batch or sequence
size. Anything else is neither, and the planner only replicates it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import graph as G


@dataclass(frozen=True)
class Locality:
    batch_wise: bool
    token_wise: bool
    why: str = ""  # for an error message: what makes it sequence- or batch-mixing

    def __and__(self, other: "Locality") -> "Locality":
        return Locality(self.batch_wise and other.batch_wise, self.token_wise and other.token_wise,
                        self.why or other.why)


BOTH = Locality(True, True)
BATCH_ONLY = Locality(True, False)


def neither(why: str) -> Locality:
    return Locality(False, False, why)


def mixing(why: str) -> Locality:
    return Locality(True, False, why)


# ---- allow-lists ----------------------------------------------------------------------------------------
_ELEMENTWISE_FN = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.pow,
    operator.mod, operator.pos, operator.abs,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.neg, torch.pow, torch.exp, torch.log,
    torch.tanh, torch.sigmoid, torch.relu, torch.rsqrt, torch.sqrt, torch.abs, torch.sin, torch.cos,
    torch.clamp, torch.where, torch.maximum, torch.minimum, torch.square, torch.erf, torch.reciprocal,
    torch.masked_fill, torch.lerp, torch.addcmul, torch.sign, torch.exp2, torch.log1p, torch.expm1,
    F.gelu, F.silu, F.relu, F.leaky_relu, F.elu, F.selu, F.sigmoid, F.tanh, F.softplus, F.mish, F.hardswish,
    F.relu6, F.glu, F.dropout,
}
_ELEMENTWISE_METHOD = {
    "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "tanh", "sigmoid", "relu", "rsqrt", "sqrt", "abs",
    "sin", "cos", "clamp", "clamp_min", "clamp_max", "masked_fill", "square", "reciprocal", "float", "half",
    "bfloat16", "double", "to", "type", "type_as", "contiguous", "clone", "detach", "requires_grad_", "add_",
    "mul_", "div_", "sub_", "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__", "erf",
    "sign", "lerp", "addcmul", "where", "exp2", "log1p", "expm1",
}
_SHAPE_METHOD = {"view", "reshape", "expand", "expand_as", "view_as", "reshape_as", "unsqueeze", "squeeze",
                 "flatten", "unflatten", "transpose", "permute", "swapaxes", "movedim", "t"}
_SHAPE_FN = {torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.transpose, torch.permute,
             torch.swapaxes, torch.movedim, torch.unflatten}
_DIM_REDUCE_METHOD = {"sum", "mean", "amax", "amin", "max", "min", "prod", "norm", "var", "std", "logsumexp",
                      "softmax", "log_softmax", "cumsum", "cumprod", "argmax", "argmin", "topk", "sort", "any",
                      "all", "split", "chunk", "unbind", "tensor_split", "flip", "roll", "narrow", "select"}
_DIM_REDUCE_FN = {torch.sum, torch.mean, torch.amax, torch.amin, torch.max, torch.min, torch.prod, torch.norm,
                  torch.var, torch.std, torch.logsumexp, torch.softmax, torch.log_softmax, F.softmax,
                  F.log_softmax, F.normalize, torch.cumsum, torch.cumprod, torch.argmax, torch.argmin, torch.topk,
                  torch.sort, torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.flip, torch.roll,
                  torch.narrow, torch.select, torch.cat, torch.concat, torch.stack, torch.any, torch.all}
_SIZE_FREE_FACTORIES = {"zeros", "ones", "empty", "full", "new_zeros", "new_ones", "new_empty", "new_full",
                        "zeros_like", "ones_like", "empty_like", "full_like"}  # values do not depend on size
_META_READS = {"size", "dim", "ndimension", "numel", "shape", "dtype", "device", "is_cuda", "ndim"}

# Modules fx keeps whole (torch.nn's own) that are proven token-wise (elementwise) or batch-wise.
_ELEMENTWISE_MODULES = (nn.Identity, nn.Dropout, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU,
                        nn.ELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardswish, nn.ReLU6, nn.GLU)
_BATCH_FIRST_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                        nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer, nn.GRU, nn.LSTM, nn.RNN)


def is_meta_read(node) -> bool:
    """An fx node that reads only a tensor's metadata (its size, dtype, device), never its values."""
    if node.op == "call_method":
        return node.target in _META_READS
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _META_READS
    return False


# ---- the classification -----------------------------------------------------------------------------------
def _syms(e) -> set:
    return sympy.sympify(e).free_symbols if not isinstance(e, (int, float)) else set()


def _layout(meta, which: str) -> str | None:
    """None if this tensor keeps B (alone, or as the leading factor) in dim 0 and S in dim 1 as the sharded
    placements assume; else why not. which: "batch" checks B only, "token" checks B and S."""
    shape = meta.shape
    has_b = [i for i, d in enumerate(shape) if G.B in _syms(d)]
    if has_b and (has_b != [0] or not _leading(shape[0], G.B)):
        return f"batch dim B is not the leading dim of {meta}"
    if which == "token":
        if len(shape) < 2 or shape[0] != G.B or shape[1] != G.S:
            return f"{meta} is not laid out [B, S, ...]"
    return None


def _leading(d, sym) -> bool:
    d = sympy.sympify(d)
    return d == sym or (d.is_Mul and sym in d.args)


def _scalars(values) -> set:
    """The B/S symbols any non-tensor argument was computed from (a size read off a sharded tensor)."""
    out: set = set()

    def walk(v):
        if isinstance(v, (torch.SymInt, torch.SymFloat)):
            out.update(s.name for s in _syms(v.node.expr) if s.name in ("B", "S"))
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, slice):
            walk([v.start, v.stop, v.step])
    walk(values)
    return out


def _dims_arg(node, args, kwargs, ndim: int) -> list[int] | None:
    """The dims a reduction/split/concat acts on, normalised; None when it acts on all dims."""
    d = kwargs.get("dim", kwargs.get("dims"))
    if d is None:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        pos = 2 if name in ("split", "chunk", "tensor_split", "topk", "narrow", "roll") else 1
        if name in ("cat", "concat", "stack"):
            pos = 1
        d = args[pos] if len(args) > pos and not (isinstance(args[pos], bool)) else None
        if name in ("split", "chunk", "tensor_split", "topk") and d is None:
            d = -1 if name == "topk" else 0
        if name in ("cat", "concat", "stack") and d is None:
            d = 0
        if name in ("softmax", "log_softmax", "cumsum", "cumprod") and d is None:
            return None
    if d is None:
        return None
    ds = list(d) if isinstance(d, (list, tuple)) else [d]
    if not all(isinstance(x, int) for x in ds):
        return None
    return [x % ndim if ndim else 0 for x in ds]


def _index_locality(index, ndim: int) -> Locality:
    """tensor[index]: sound for DP if dim 0 is taken whole, for seq if dims 0 and 1 are."""
    idx = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) or i is None for i in idx) or sum(i is Ellipsis for i in idx) > 1:
        return neither("advanced indexing")
    if Ellipsis in idx:  # the entries after the Ellipsis index the last dims
        k = idx.index(Ellipsis)
        head, tail = idx[:k], idx[k + 1:]
        dims = [d for d, i in enumerate(head) if not _full(i)]
        dims += [ndim - len(tail) + d for d, i in enumerate(tail) if not _full(i)]
    else:
        dims = [d for d, i in enumerate(idx) if not _full(i)]
    if 0 in dims:
        return neither("indexes the batch dim")
    return mixing("indexes the sequence dim") if 1 in dims else BOTH


def _full(i) -> bool:
    return i is Ellipsis or (isinstance(i, slice) and i == slice(None))


def classify(node, args, kwargs, in_metas, moved, module: nn.Module | None = None) -> Locality:
    """Locality of one generic op (an fx node evaluated on fake tensors). in_metas: TensorMetas of the tensors it
    reads as data (parameters included); moved: those a placement shards (its outputs and non-parameter inputs:
    parameters are handed to the op whole), whose layout must be [B, S, ...] for sequence sharding."""
    kind = _target_kind(node, module)
    tensors = list(moved)
    batch_free = all(G.B not in set().union(*[_syms(d) for d in m.shape]) for m in tensors) if tensors else True
    scal = _scalars((args, kwargs)) if kind not in ("shape", "factory_free") else set()
    loc = _by_target(kind, node, args, kwargs, in_metas, module)
    if "B" in scal:
        loc = loc & neither("computes with the local batch size")
    if "S" in scal:
        loc = loc & Locality(loc.batch_wise, False, "computes with the local sequence length")
    if batch_free and "B" not in scal and not loc.batch_wise:
        loc = Locality(True, loc.token_wise, loc.why)  # the same on every data-parallel rank
    for m in tensors:
        if loc.batch_wise and (why := _layout(m, "batch")):
            loc = Locality(batch_free, False, why)
        if loc.token_wise and (why := _layout(m, "token")):
            loc = Locality(loc.batch_wise, False, why)
    return loc


def _target_kind(node, module) -> str:
    t = node.target
    if node.op == "call_module":
        return "module"
    if node.op == "call_method":
        if t in _ELEMENTWISE_METHOD:
            return "elementwise"
        if t in _SHAPE_METHOD:
            return "shape"
        if t in _DIM_REDUCE_METHOD:
            return "dim"
        if t in _SIZE_FREE_FACTORIES:
            return "factory_free"
        if t == "__getitem__":
            return "index"
        return "unknown"
    if t is operator.getitem:
        return "index"
    if t in _ELEMENTWISE_FN:
        return "elementwise"
    if t in _SHAPE_FN:
        return "shape"
    if t in _DIM_REDUCE_FN:
        return "dim"
    if getattr(t, "__name__", "") in _SIZE_FREE_FACTORIES and getattr(t, "__module__", "") in ("torch", None):
        return "factory_free"
    if t in (F.linear, torch.matmul, operator.matmul, torch.bmm, torch.mm):
        return "matmul"
    if t in (F.embedding,):
        return "embedding"
    if t in (F.layer_norm, getattr(F, "rms_norm", None)):
        return "norm"
    if t is F.scaled_dot_product_attention:
        return "sdpa"
    return "unknown"


def _by_target(kind: str, node, args, kwargs, in_metas, module) -> Locality:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if kind in ("elementwise", "shape", "factory_free", "embedding"):
        return BOTH  # shapes decide the rest (a transpose of dims 0/1 fails the layout check)
    if kind == "index" and not isinstance(args[0], torch.Tensor):
        return BOTH  # an element of a tuple (split's pieces): the tuple's producer was judged
    if kind == "index":
        ndim = len(in_metas[0].shape) if in_metas else 0
        return _index_locality(args[1], ndim)
    if kind == "dim":
        ndim = len(in_metas[0].shape) if in_metas else 0
        dims = _dims_arg(node, args, kwargs, ndim)
        if dims is None:
            return neither(f"{name} over every dim")
        if 0 in dims:
            return neither(f"{name} over the batch dim")
        return mixing(f"{name} over the sequence dim") if 1 in dims else BOTH
    if kind == "matmul":
        weight_like = len(in_metas) >= 2 and all(not _syms(d) for m in in_metas[1:] for d in m.shape)
        return BOTH if weight_like else mixing(f"{name} of two activations")
    if kind == "norm":
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        k = len(shape) if isinstance(shape, (list, tuple)) else 1
        ndim = len(in_metas[0].shape)
        return BOTH if ndim - k >= 2 else (BATCH_ONLY if ndim - k >= 1 else neither("normalises dim 0"))
    if kind == "sdpa":
        return mixing("scaled_dot_product_attention mixes positions")
    if kind == "module":
        return module_locality(module, len(in_metas[0].shape) if in_metas else 0)
    return neither(f"{name} is not on meshplan's list of proven token-wise or batch-wise ops")


def module_locality(module: nn.Module | None, ndim: int) -> Locality:
    """Locality of a torch.nn module that fx keeps whole (not registered as a meshplan leaf)."""
    if isinstance(module, _ELEMENTWISE_MODULES):
        return BOTH
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        d = module.dim % ndim if module.dim is not None and ndim else None
        return BOTH if d is not None and d >= 2 else (mixing("softmax over the sequence") if d == 1 else
                                                      neither("softmax over the batch"))
    if isinstance(module, _BATCH_FIRST_MODULES):
        first = getattr(module, "batch_first", None)
        if first is None and isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
            first = getattr(module.layers[0], "self_attn").batch_first
        return mixing(f"{type(module).__name__} mixes positions") if first else \
            neither(f"{type(module).__name__}(batch_first=False) takes [S, B, ...]")
    if isinstance(module, (nn.Conv1d, nn.GroupNorm, nn.InstanceNorm1d)):
        return mixing(f"{type(module).__name__} mixes positions")
    if isinstance(module, nn.Flatten):
        return BATCH_ONLY if module.start_dim >= 1 else neither("flattens the batch dim")
    return neither(f"{type(module).__name__} is not on meshplan's list of proven token-wise or batch-wise modules; "
                   f"register it: meshplan.ir.register_leaf({type(module).__name__}, kind='generic', "
                   f"token_wise=..., batch_wise=...)")


__all__ = ["Locality", "BOTH", "BATCH_ONLY", "classify", "module_locality", "is_meta_read", "neither", "mixing"]
