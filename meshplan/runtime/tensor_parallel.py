"""Megatron tensor parallelism: replicated input on the model axis, a Partial sum out.

The all-gather before (sequence-sharded -> replicated) and the reduce-scatter after (Partial -> sequence-sharded)
are reshardings on the graph's edges, done by the executor; these functions are the local compute between them.

- attention "tp": heads split. wq (and wk/wv when the KV heads divide among the ranks) column-parallel, with
  their biases and per-head q/k norms, wo row-parallel (its bias added by the rank at coordinate 0). With fewer
  KV heads than ranks every rank keeps all of wk/wv and projects only the KV head its query heads share (query
  head h uses KV head h // m, as in the model's repeat_interleave). Multi-head latent attention (mla.py) runs its
  own math on the rank's heads.
- dense FFN "tp": w1/w3 rows and w2 columns split; the module's own forward on the split weights is the summand.
- linear "tp": row-parallel, the weight's in_features split; each rank multiplies its slice of the replicated
  input. A bias is added once, by the rank at coordinate 0, so the Partial sums to the true output.
- embedding "vocab": table rows split; a token outside this rank's rows contributes zeros. Sequence-sharded token
  ids are first all-gathered (integers, no gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir.placement import Shard
from ..ir.strategies import IDS
from ..models.mla import mla
from ..models.moe_transformer import causal_attention, project_qkv, rotate
from .collectives import all_gather
from .local_ops import module_forward
from .op_context import OpContext


def attention_tp(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    a, p, n, r = ctx.attrs, ctx.params, ctx.n, ctx.index
    b, s, _ = x.shape
    if a.get("mla"):  # latent attention: the same math on this rank's heads (models/mla.py)
        return mla(x, p, a, p["rope_cos"][:s], p["rope_sin"][:s], o_bias=r == 0)
    hd, n_kv = a["head_dim"], a["n_kv_heads"]
    if a.get("qk_norm") == "proj" and n > 1:  # refused by the plan's validation (ir/ops.py); never run it wrong
        raise NotImplementedError(f"op {ctx.op.name!r}: a q/k norm over the whole projection under head-split tp")
    # n | n_kv: this rank's KV heads are its rows of wk/wv. Else n // n_kv consecutive ranks share one KV head.
    rows = None if n_kv % n == 0 else slice((r // (n // n_kv)) * hd, (r // (n // n_kv) + 1) * hd)
    q, k, v = project_qkv(x, p, a, kv_rows=rows)
    cos, sin = p["rope_cos"][:s], p["rope_sin"][:s]
    style = a.get("rope", "interleaved")
    q, k = rotate(q, cos, sin, style), rotate(k, cos, sin, style)
    out = F.linear(causal_attention(q, k, v, scale=a.get("scale")).reshape(b, s, -1), p["wo.weight"])
    bias = p.get("wo.bias")
    return out + bias if bias is not None and r == 0 else out  # added once to the Partial sum


def ffn_tp(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    return module_forward(ctx, x)


def linear_tp(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    w = ctx.params["weight"]
    xs = x.chunk(ctx.n, dim=-1)[ctx.index] if ctx.n > 1 else x
    out = F.linear(xs, w)
    bias = ctx.params.get("bias")
    if bias is not None and ctx.index == 0:
        out = out + bias
    return out


def embedding_vocab(ctx: OpContext, ids: torch.Tensor) -> torch.Tensor:
    m = ctx.module
    if getattr(m, "padding_idx", None) is not None or getattr(m, "max_norm", None) is not None:
        raise NotImplementedError(f"op {ctx.op.name!r}: vocab-parallel embedding with padding_idx/max_norm")
    if isinstance(ctx.model_axis_input(), Shard) and ctx.n > 1:
        ids = all_gather(ids, ctx.model_axis_input().dim, ctx.channel(IDS))
    w = ctx.params["weight"]
    rows = w.shape[0]
    local = ids - ctx.index * rows
    inside = (local >= 0) & (local < rows)
    out = F.embedding(local.clamp(0, rows - 1), w)
    return out * inside.unsqueeze(-1).to(out.dtype)
