"""Triton kernel for the MoE combine (see moe_unpermute.py). Importing it imports triton.

Grid: (token, block of hidden columns). The k slots are a static loop, so the sum is
accumulated in float32 registers in slot order and written once: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import launch_guard
from .fp8 import FP8_DTYPE
from .fp8_triton import block_h_for, e4m3_decode

MAX_BLOCK_H = 1024  # columns per program; wide rows are split across programs instead


@triton.jit
def _unpermute_kernel(y_ptr, scale_ptr, row_id_ptr, w_ptr, out_ptr, H, stride_y, stride_out,
                      K: tl.constexpr, FP8: tl.constexpr, BLOCK_H: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for j in tl.static_range(K):
        src = tl.load(row_id_ptr + tok * K + j).to(tl.int64)
        w = tl.load(w_ptr + tok * K + j).to(tl.float32)
        v = tl.load(y_ptr + src * stride_y + cols, mask=mask, other=0)
        if FP8:
            # Fold the row scale into the weight: one multiply per element instead of two.
            v = e4m3_decode(v)
            w = w * tl.load(scale_ptr + src)
        acc += w * v.to(tl.float32)
    tl.store(out_ptr + tok * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def unpermute_into(y: torch.Tensor, row_id_map: torch.Tensor, topk_weights: torch.Tensor,
                   out: torch.Tensor, scales: torch.Tensor | None = None,
                   block_h: int | None = None) -> None:
    """out[t] = sum_j w[t, j] * y[row_id_map[t, j]] (y dequantised with scales if given)."""
    T, K = row_id_map.shape
    H = y.shape[1]
    fp8 = scales is not None
    if fp8:
        y = (y.view(torch.uint8) if y.dtype == FP8_DTYPE else y)
        scales = scales.float().contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    assert out.shape == (T, H) and out.stride(-1) == 1
    if T == 0:
        return
    bh = block_h or min(block_h_for(H), MAX_BLOCK_H)
    grid = (T, triton.cdiv(H, bh))
    with launch_guard():
        _unpermute_kernel[grid](y, scales if fp8 else y, row_id_map.contiguous(), topk_weights.contiguous(),
                                out, H, y.stride(0), out.stride(0),
                                K=K, FP8=fp8, BLOCK_H=bh, num_warps=4)
