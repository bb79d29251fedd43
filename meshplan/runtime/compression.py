"""Wire formats of compressed collectives (docs/reference.md, "Communication compression").

A collective's precision is its wire format, never its arithmetic: values are encoded just before the bytes
move and decoded to float32 (or the tensor's dtype) on arrival, and every reduction sums decoded values in
float32. Formats:
  "fp32"  the tensor's own dtype, unchanged.
  "bf16"  one cast to bfloat16 (2 bytes per value).
  "fp8"   E4M3 codes (1 byte, shipped as their uint8 view because gloo has no fp8 type) and float32 scales:
          - "row": one scale per token row (the last dim is the channel dim), the forward's format; it is the
            codegen kernel `quantize_fp8` (Triton on CUDA, its torch reference on CPU), so the runtime and the
            fused MoE permute round identically.
          - "block": one scale per channel per group of 128 tokens, the backward's format (gradients have
            outlier channels rather than outlier tokens; per-row scales would flush a whole quiet channel).
A layout that cannot apply (a split along the channel dim, a 1-D tensor) falls back to bf16.
"""
from __future__ import annotations

import torch

from ..kernels import FP8_MAX, quantize_fp8
from ..kernels.fp8 import AMAX_FLOOR

FP8 = torch.float8_e4m3fn
BLOCK_TOKENS = 128
PRECISIONS = ("fp32", "bf16", "fp8")
Parts = tuple[list[torch.Tensor], str]


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown collective precision {precision!r} (expected fp32, bf16 or fp8)")


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., C] -> (uint8 codes [..., C], float32 scales [..., 1]), one scale per row of the last dim."""
    flat = x.reshape(-1, x.shape[-1])
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        flat = flat.float()
    q, s = quantize_fp8(flat)
    return q.view(torch.uint8).view(x.shape), s.view(*x.shape[:-1], 1)


def fp8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., C] -> (uint8 codes [..., C], float32 scales [G, C]) with G = ceil(tokens / 128): one scale per
    channel per group of 128 consecutive tokens (rows of the flattened [tokens, C] view)."""
    c = x.shape[-1]
    rows = x.reshape(-1, c).float()
    t = rows.shape[0]
    g = -(-t // BLOCK_TOKENS)
    padded = torch.cat([rows, rows.new_zeros(g * BLOCK_TOKENS - t, c)]) if g * BLOCK_TOKENS != t else rows
    scale = padded.view(g, BLOCK_TOKENS, c).abs().amax(1).clamp_min(AMAX_FLOOR) / FP8_MAX
    # clamp before the cast: values beyond the e4m3 range become NaN, and x / s can exceed 448 by an ulp
    q = (rows / scale.repeat_interleave(BLOCK_TOKENS, 0)[:t]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(torch.uint8).view(x.shape), scale


def encode(x: torch.Tensor, precision: str, layout: str | None) -> Parts:
    """x -> (the tensors to send, how to decode them). layout: "row", "block" or None (no fp8 layout fits)."""
    _check(precision)
    if x.dtype == torch.bool:
        return [x.view(torch.uint8)], "bool"
    if precision == "fp32" or not x.is_floating_point():
        return [x], "raw"
    if precision == "fp8" and layout is not None and x.dim() >= 2 and x.numel():
        if layout == "row":
            return list(fp8_rows(x)), "fp8_row"
        if layout == "block":
            return list(fp8_blocks(x)), "fp8_block"
        raise ValueError(f"unknown fp8 layout {layout!r}")
    return [x.to(torch.bfloat16)], "bf16"


def decode(parts: list[torch.Tensor], how: str, dtype: torch.dtype, stacked: bool = False) -> torch.Tensor:
    """Inverse of encode, on what arrived. stacked: the parts carry a leading dim of n senders (an all-gather),
    each with its own block scales."""
    if how == "bool":
        return parts[0].view(torch.bool)
    if how == "fp8_row":
        return (parts[0].view(FP8).float() * parts[1]).to(dtype)
    if how == "fp8_block":
        q, s = parts
        n = q.shape[0] if stacked else 1
        rows = q.view(FP8).float().reshape(n, -1, q.shape[-1])
        scale = s.view(n, -1, q.shape[-1]).repeat_interleave(BLOCK_TOKENS, 1)[:, : rows.shape[1]]
        return (rows * scale).view(q.shape).to(dtype)
    return parts[0].to(dtype)


def roundtrip(x: torch.Tensor, precision: str, layout: str | None = "row") -> torch.Tensor:
    """x as a receiver sees it after one trip over the wire (what the error model measures)."""
    parts, how = encode(x, precision, layout)
    return decode(parts, how, x.dtype)


def wire_bytes(x: torch.Tensor, precision: str, layout: str | None = "row") -> int:
    parts, _ = encode(x, precision, layout)
    return sum(p.nbytes for p in parts)
