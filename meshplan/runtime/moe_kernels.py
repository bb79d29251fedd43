"""The runtime's MoE compute on codegen's Triton kernels: the grouped SwiGLU expert GEMMs and the fused
un-permute + top-k weighted combine, made differentiable.

moe_routing.run_experts and moe_routing.combine call these when the kernels' backend resolves to Triton (CUDA
tensors, or any tensor under MESHPLAN_KERNELS=triton with TRITON_INTERPRET=1, which is how the CPU tests run this
path) outside a torch.compile trace; otherwise they run their torch code. Forward is the Triton kernel. Backward is
torch: the expert FFN recomputes its forward through the kernels' differentiable torch reference (activation
recompute: nothing but the inputs is saved) and differentiates that; the combine's backward is two gathers. Both
always return a gradient for the rows, zeros if need be, so that the all-to-all backward behind them runs on every
rank.
"""
from __future__ import annotations

import torch
from torch.autograd import Function

from ..kernels import expert_ffn, resolve_backend, unpermute


def use_triton(x: torch.Tensor, op: str) -> bool:
    """Eager only: inside a torch.compile trace (compile.py) the torch code is traced and inductor writes the
    kernels; these Functions' data-dependent launches (grids from the rows per expert) are not checked there."""
    return not torch.compiler.is_compiling() and resolve_backend("auto", x, op) == "triton"


class _ExpertFFN(Function):
    """Expert-sorted rows [N, D] (counts[e] rows for local expert e) through their SwiGLU experts."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, counts):
        ctx.save_for_backward(x, w1, w3, w2, counts)
        return expert_ffn(x, w1, w3, w2, counts, backend="triton")

    @staticmethod
    def backward(ctx, gy):
        x, w1, w3, w2, counts = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, w1, w3, w2)]
            y = expert_ffn(*leaves, counts, backend="torch")
            grads = torch.autograd.grad(y, leaves, gy, allow_unused=True) if y.numel() else [None] * 4
        return (*(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)), None)


def expert_ffn_sorted(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                      xs: torch.Tensor) -> torch.Tensor:
    """Rows sorted by local expert (counts[e] for expert e) through the grouped Triton GEMMs."""
    return _ExpertFFN.apply(xs, w1, w3, w2, counts)


class _Combine(Function):
    """out[t] = sum over kept slots j of weights[t, j] * y[row of (t, j)], float32 sums, in `dtype`."""

    @staticmethod
    def forward(ctx, y, weights, tok, slot, n_tokens, dtype):
        k, rows = weights.shape[1], tok.numel()
        # Every (token, slot) pair needs a row: pairs the capacity dropped point at an appended zero row.
        pad = n_tokens * k - rows
        row_id = torch.full((n_tokens, k), rows, dtype=torch.int64, device=y.device)
        row_id[tok, slot] = torch.arange(rows, device=y.device)
        y_all = torch.cat([y, y.new_zeros(pad, y.shape[1])]) if pad else y
        ctx.save_for_backward(y, weights, tok, slot)
        return unpermute(y_all, row_id, weights, out_dtype=dtype, backend="triton")

    @staticmethod
    def backward(ctx, g):
        y, weights, tok, slot = ctx.saved_tensors
        gt = g.float()[tok]  # [rows, D]: each kept pair's token gradient
        gy = (gt * weights[tok, slot, None].float()).to(y.dtype)
        gw = torch.zeros_like(weights, dtype=torch.float32)
        gw[tok, slot] = (gt * y.float()).sum(-1)
        return gy, gw.to(weights.dtype), None, None, None, None


def combine_rows(n_tokens: int, tok: torch.Tensor, slot: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """moe_routing.combine through the fused Triton un-permute + weighted-sum kernel."""
    return _Combine.apply(y, weights, tok, slot, n_tokens, dtype)
