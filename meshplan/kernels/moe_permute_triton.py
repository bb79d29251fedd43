"""Triton kernel for the MoE dispatch permute (see moe_permute.py for the order).

One program per source token: it reads the token's row once, optionally quantises it to
FP8 with the row's scale, and writes it to each of its k destination rows. Scattering by
token rather than gathering by destination row is what gives the single read of the
activations: a gather would read every token k times and recompute its scale k times.
The stores are whole rows, so they stay coalesced. Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import launch_guard
from .fp8 import as_fp8
from .fp8_triton import block_h_for, e4m3_encode, looped_row_scale, row_scale


@triton.jit
def _store_copies(buf_ptr, row_id_ptr, tok, stride_buf, cols, out, mask, K: tl.constexpr):
    """Write one block of a token's (encoded) row to each of its k destination rows."""
    for j in tl.static_range(K):
        dst = tl.load(row_id_ptr + tok * K + j).to(tl.int64)
        tl.store(buf_ptr + dst * stride_buf + cols, out, mask=mask)


@triton.jit
def _store_scales(scale_ptr, row_id_ptr, tok, scale, K: tl.constexpr):
    """Each destination row of the token gets the row's FP8 scale."""
    for j in tl.static_range(K):
        dst = tl.load(row_id_ptr + tok * K + j).to(tl.int64)
        tl.store(scale_ptr + dst, scale)


@triton.jit
def _permute_kernel(x_ptr, row_id_ptr, buf_ptr, scale_ptr, H, stride_x, stride_buf,
                    K: tl.constexpr, QUANT: tl.constexpr,
                    BLOCK_H: tl.constexpr, ONE_PASS: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + tok * stride_x
    if ONE_PASS:  # the row fits one block: one read, k writes
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        if QUANT:
            xf = x.to(tl.float32)
            scale = row_scale(tl.max(tl.abs(xf), axis=0))
            out = e4m3_encode(tl.math.div_rn(xf, scale))
            _store_scales(scale_ptr, row_id_ptr, tok, scale, K)
        else:
            out = x
        _store_copies(buf_ptr, row_id_ptr, tok, stride_buf, cols, out, mask, K)
    else:  # wide rows: the amax pass reads the row, the write pass re-reads it (from L2)
        if QUANT:
            scale = looped_row_scale(x_row, H, BLOCK_H)
        for start in range(0, H, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            mask = cols < H
            x = tl.load(x_row + cols, mask=mask, other=0.0)
            if QUANT:
                out = e4m3_encode(tl.math.div_rn(x.to(tl.float32), scale))
            else:
                out = x
            _store_copies(buf_ptr, row_id_ptr, tok, stride_buf, cols, out, mask, K)
        if QUANT:
            _store_scales(scale_ptr, row_id_ptr, tok, scale, K)


def permute_into(x: torch.Tensor, row_id_map: torch.Tensor, buf: torch.Tensor,
                 scales: torch.Tensor | None, block_h: int | None = None) -> None:
    """buf[row_id_map[t, j]] = x[t] (fp8-quantised with scales[...] when scales is given).

    buf: [T*k, H], x.dtype, or fp8/uint8 when quantising; scales: float32 [T*k] or None.
    """
    T, H = x.shape
    K = row_id_map.shape[1]
    quant = scales is not None
    x = x if x.stride(-1) == 1 else x.contiguous()
    row_id_map = row_id_map.contiguous()
    if quant:
        buf = as_fp8(buf).view(torch.uint8)
        assert scales.dtype == torch.float32 and scales.is_contiguous()
    else:
        assert buf.dtype == x.dtype, f"permute: buffer {buf.dtype} != activations {x.dtype}"
    assert buf.shape == (T * K, H) and buf.stride(-1) == 1
    if T == 0:
        return
    bh = block_h_for(H, block_h)
    with launch_guard():
        _permute_kernel[(T,)](x, row_id_map, buf, scales if quant else buf, H, x.stride(0), buf.stride(0),
                              K=K, QUANT=quant, BLOCK_H=bh, ONE_PASS=H <= bh,
                              num_warps=8 if bh >= 4096 else 4)
