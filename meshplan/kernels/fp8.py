"""Per-token FP8 (E4M3) quantisation for MoE dispatch (docs/reference.md, "Communication compression").

Each row (token) t of x[T, H] gets one float32 scale s_t = amax_t / 448, where 448 is the
largest finite float8_e4m3fn, and is sent as q = fp8(clamp(x / s_t, -448, 448)) with
round-to-nearest-even. A per-token scale keeps each token's own dynamic range, so the
relative error of every normal element is at most 2^-4 (3 mantissa bits); elements below
2^-6 * s_t fall into the subnormals and keep an absolute error of at most 2^-10 * s_t.

The comm layer ships q as `q.view(torch.uint8)` (gloo has no fp8), so every function here
also accepts that uint8 view wherever it takes fp8 codes.

Zero rows: amax is floored at 2^-100 so the scale stays a normal float and 0 / s = 0 exactly.
Non-finite inputs are not supported (an inf makes the whole row's scale inf).
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 2.0 ** -100  # a power of two: the same float in torch and in the kernel


def as_fp8(q: torch.Tensor) -> torch.Tensor:
    """Accept fp8 codes either as float8_e4m3fn or as their uint8 wire view."""
    if q.dtype == torch.uint8:
        return q.view(FP8_DTYPE)
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"expected float8_e4m3fn codes (or their uint8 view), got {q.dtype}")
    return q


def _check_rows(x: torch.Tensor, op: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: expected a [T, H] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: expected float32/bfloat16/float16 activations, got {x.dtype}")


def row_scales_ref(x: torch.Tensor) -> torch.Tensor:
    """float32 [T] per-row scales, amax / 448, computed exactly as the kernel does."""
    amax = x.float().abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    # Divide by a tensor, not the Python float: for a scalar divisor torch's CUDA kernel multiplies by the
    # reciprocal (1/448 is inexact), which differs from the correctly rounded quotient in the last bit for some
    # rows (seen on an H200, 2026-11-25); tensor / tensor is IEEE division on CPU and CUDA alike.
    return amax / torch.full_like(amax, FP8_MAX)


def quantize_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: x[T, H] -> (q float8_e4m3fn [T, H], scale float32 [T])."""
    _check_rows(x, "quantize_fp8_ref")
    scale = row_scales_ref(x)
    # Clamp before the cast: torch maps finite values beyond the e4m3 range to NaN, and
    # x / s can exceed 448 by an ulp after rounding.
    q = (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8_ref(q: torch.Tensor, scale: torch.Tensor,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Torch reference: (q [T, H], scale [T]) -> q * scale in out_dtype (product in float32)."""
    return (as_fp8(q).float() * scale.float()[:, None]).to(out_dtype)


def quantize_fp8(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 E4M3 quantisation: x[T, H] -> (q float8_e4m3fn [T, H], scale float32 [T]).

    The Triton kernel reads each row once and is bit-identical to `quantize_fp8_ref`.
    """
    _check_rows(x, "quantize_fp8")
    if resolve_backend(backend, x, "quantize_fp8") == "torch":
        return quantize_fp8_ref(x)
    from . import fp8_triton

    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    fp8_triton.quantize_into(x, q, scale)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                   backend: str = "auto") -> torch.Tensor:
    """(q [T, H] fp8 or its uint8 view, scale float32 [T]) -> q * scale as out_dtype [T, H]."""
    q = as_fp8(q)
    if q.dim() != 2 or scale.shape != (q.shape[0],):
        raise ValueError(f"dequantize_fp8: q {tuple(q.shape)} needs scale [{q.shape[0]}], "
                         f"got {tuple(scale.shape)}")
    if resolve_backend(backend, q, "dequantize_fp8") == "torch":
        return dequantize_fp8_ref(q, scale, out_dtype)
    from . import fp8_triton

    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    fp8_triton.dequantize_into(q, scale, out)
    return out
