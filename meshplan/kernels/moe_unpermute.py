"""MoE combine: un-permute expert outputs, dequantise, and take the top-k weighted sum.

After the combine all-to-all the expert outputs are back on the token's rank, in the same
dispatch order that `permute` produced (the combine is the dispatch with the splits
swapped), so its `row_id_map` locates every (token, slot) row:

    out[t] = sum_j topk_weights[t, j] * y[row_id_map[t, j]]        (float32 accumulation)

y may be float32/bfloat16, or FP8 codes (float8_e4m3fn or their uint8 wire view) with per-row
float32 scales. The Triton kernel gives every token its own program, which reads that
token's k rows and writes its output once, so no atomics and a fixed summation order.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from .fp8 import FP8_DTYPE

_FP8_LIKE = (FP8_DTYPE, torch.uint8)


def _resolve_out_dtype(y: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return torch.bfloat16 if y.dtype in _FP8_LIKE else y.dtype


def _check(y, row_id_map, topk_weights, scales):
    if row_id_map.dim() != 2 or topk_weights.shape != row_id_map.shape:
        raise ValueError(f"unpermute: row_id_map {tuple(row_id_map.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T, k]")
    if y.dim() != 2 or y.shape[0] != row_id_map.numel():
        raise ValueError(f"unpermute: y must be [T*k={row_id_map.numel()}, H], got {tuple(y.shape)}")
    fp8 = y.dtype in _FP8_LIKE
    if fp8 != (scales is not None):
        raise ValueError(f"unpermute: y is {y.dtype}; scales are required for fp8 rows "
                         "and must be None otherwise")
    if fp8 and scales.shape != (y.shape[0],):
        raise ValueError(f"unpermute: scales must be [{y.shape[0]}], got {tuple(scales.shape)}")


def unpermute_ref(y: torch.Tensor, row_id_map: torch.Tensor, topk_weights: torch.Tensor, *,
                  scales: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch reference (differentiable in y and topk_weights for float y)."""
    _check(y, row_id_map, topk_weights, scales)
    dtype = _resolve_out_dtype(y, out_dtype)
    if scales is not None:
        rows = y.view(FP8_DTYPE).float() * scales.float()[:, None]
    else:
        rows = y.float()
    T, k = row_id_map.shape
    picked = rows[row_id_map.reshape(-1)].view(T, k, y.shape[1])
    return (picked * topk_weights.float()[..., None]).sum(dim=1).to(dtype)


def unpermute(y: torch.Tensor, row_id_map: torch.Tensor, topk_weights: torch.Tensor, *,
              scales: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Combine expert outputs y [T*k, H] (dispatch order) into out [T, H].

    out_dtype defaults to y.dtype, or bfloat16 when y holds fp8 codes.
    """
    _check(y, row_id_map, topk_weights, scales)
    if resolve_backend(backend, y, "unpermute") == "torch":
        return unpermute_ref(y, row_id_map, topk_weights, scales=scales, out_dtype=out_dtype)
    from . import moe_unpermute_triton

    out = torch.empty((row_id_map.shape[0], y.shape[1]), dtype=_resolve_out_dtype(y, out_dtype),
                      device=y.device)
    moe_unpermute_triton.unpermute_into(y, row_id_map, topk_weights, out, scales)
    return out
