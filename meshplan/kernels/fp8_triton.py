"""Triton kernels for per-token FP8 E4M3 quantisation (see fp8.py for the format).

Compiled for a GPU, the E4M3 encode/decode is the hardware conversion (a cast to
tl.float8e4nv after clamping to +-448: cvt.rn.satfinite on sm_89+, round-to-nearest-even,
torch's rounding). In Triton's CPU interpreter the cast neither saturates nor rounds
subnormals to nearest-even, so there the codec is integer bit manipulation, exact in the
same way. Which one runs is fixed per process (HW_FP8, from TRITON_INTERPRET at import).
On an H200 the bit codec left the quantise kernel at 44% of copy bandwidth, issue-bound on its
~20 integer operations per element. Codes travel as uint8, which is also how the comm layer
ships them.

The `e4m3_encode`, `e4m3_decode` and `row_scale` helpers are reused by the MoE permute and
unpermute kernels. Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import launch_guard, next_pow2, triton_interpret
from .fp8 import AMAX_FLOOR, FP8_MAX, as_fp8

MAX_BLOCK_H = 8192  # rows up to this width are read once; wider rows take a second (L2) read
AMAX_FLOOR_C = tl.constexpr(AMAX_FLOOR)  # jit code may only read constexpr globals
FP8_MAX_C = tl.constexpr(FP8_MAX)
HW_FP8 = tl.constexpr(not triton_interpret())  # compiled: the hardware fp8 conversion; interpreted: bit codec


@triton.jit
def e4m3_encode(y):
    """float32 -> float8_e4m3fn bit pattern (uint8), nearest-even, saturating to +-448."""
    if HW_FP8:
        return tl.clamp(y, -448.0, 448.0).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        return e4m3_encode_bits(y)


@triton.jit
def e4m3_decode(code):
    """float8_e4m3fn bit pattern (uint8) -> float32, exact. NaN codes (0x7F/0xFF) are never produced by
    e4m3_encode; they decode as NaN compiled and as +-480 in the interpreter."""
    if HW_FP8:
        return code.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        return e4m3_decode_bits(code)


@triton.jit
def e4m3_encode_bits(y):
    """e4m3_encode in integer arithmetic (what the interpreter runs)."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80  # the float32 sign bit, moved to bit 7
    a = tl.minimum(tl.abs(y), 448.0)  # 448 is representable, so rounding cannot exceed it
    ab = a.to(tl.int32, bitcast=True)
    # Normal e4m3 (a >= 2^-6): drop 20 of float32's 23 mantissa bits with nearest-even
    # rounding; a carry out of the mantissa bumps the exponent, as it should. Then rebias the
    # exponent from 127 to 7: (127 - 7) << 3 in the shifted [exponent|mantissa] field.
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal e4m3: code = round_half_even(a * 2^9). With the implicit bit restored,
    # a = mant * 2^(e - 150), so a * 2^9 = mant >> (141 - e). Shifts are capped at 31 (all
    # such values round to 0); mant + 2^30 still fits in int32.
    e = ab >> 23
    mant = (ab & 0x7FFFFF) | 0x800000
    shift = tl.minimum(141 - e, 31)
    half = (tl.full(shift.shape, 1, tl.int32) << (shift - 1))
    sub = (mant + (half - 1) + ((mant >> shift) & 1)) >> shift
    code = tl.where(ab >= (121 << 23), normal, sub)
    return (code | sign).to(tl.uint8)


@triton.jit
def e4m3_decode_bits(code):
    """e4m3_decode in integer arithmetic (what the interpreter runs)."""
    c = code.to(tl.int32)
    e = (c >> 3) & 0xF
    m = c & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # m * 2^-9
    sign = tl.where((c & 0x80) != 0, -1.0, 1.0)
    return tl.where(e == 0, sub, normal) * sign


@triton.jit
def row_scale(amax):
    # div_rn: plain `/` lowers to an approximate division on NVIDIA GPUs, which would break
    # bit-equality with the torch reference.
    return tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR_C), FP8_MAX_C)


@triton.jit
def looped_row_scale(x_row, H, BLOCK_H: tl.constexpr):
    """The scale of a row too wide for one block: an amax pass over it, BLOCK_H columns at a time."""
    amax = tl.zeros((BLOCK_H,), tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        x = tl.load(x_row + cols, mask=cols < H, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    return row_scale(tl.max(amax, axis=0))


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, scale_ptr, H, stride_x, stride_q,
                     BLOCK_H: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if ONE_PASS:  # the whole row fits one block: a single read from memory
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        scale = row_scale(tl.max(tl.abs(x), axis=0))
        tl.store(q_row + cols, e4m3_encode(tl.math.div_rn(x, scale)), mask=mask)
    else:
        scale = looped_row_scale(x_row, H, BLOCK_H)
        for start in range(0, H, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            x = tl.load(x_row + cols, mask=cols < H, other=0.0).to(tl.float32)
            tl.store(q_row + cols, e4m3_encode(tl.math.div_rn(x, scale)), mask=cols < H)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, H, stride_q, stride_out, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    code = tl.load(q_ptr + row * stride_q + cols, mask=mask, other=0)
    y = e4m3_decode(code) * tl.load(scale_ptr + row)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def block_h_for(H: int, block_h: int | None = None) -> int:
    return block_h or min(next_pow2(H), MAX_BLOCK_H)


def _num_warps(block: int) -> int:
    return 8 if block >= 4096 else 4


def quantize_into(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                  block_h: int | None = None) -> None:
    """Write fp8 codes of x[T, H] into q (fp8 or uint8 [T, H]) and scales into scale [T]."""
    T, H = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    q8 = as_fp8(q).view(torch.uint8)
    assert q8.stride(-1) == 1 and scale.is_contiguous() and scale.dtype == torch.float32
    if T == 0:
        return
    bh = block_h_for(H, block_h)
    with launch_guard():
        _quantize_kernel[(T,)](x, q8, scale, H, x.stride(0), q8.stride(0),
                               BLOCK_H=bh, ONE_PASS=H <= bh, num_warps=_num_warps(bh))


def dequantize_into(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
                    block_h: int | None = None) -> None:
    """Write q * scale (q: fp8 or uint8 [T, H], scale: float32 [T]) into out [T, H]."""
    T, H = q.shape
    q8 = as_fp8(q).view(torch.uint8)
    q8 = q8 if q8.stride(-1) == 1 else q8.contiguous()
    scale = scale.float().contiguous()
    assert out.stride(-1) == 1
    if T == 0:
        return
    bh = block_h_for(H, block_h)
    grid = (T, triton.cdiv(H, bh))
    with launch_guard():
        _dequantize_kernel[grid](q8, scale, out, H, q8.stride(0), out.stride(0),
                                 BLOCK_H=bh, num_warps=_num_warps(bh))


@triton.jit
def _encode_kernel(y_ptr, code_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(y_ptr + offs, mask=offs < n, other=0.0)
    tl.store(code_ptr + offs, e4m3_encode(y), mask=offs < n)


@triton.jit
def _decode_kernel(code_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    code = tl.load(code_ptr + offs, mask=offs < n, other=0)
    tl.store(y_ptr + offs, e4m3_decode(code), mask=offs < n)


def encode_e4m3(y: torch.Tensor) -> torch.Tensor:
    """The raw codec on a float32 tensor, no scaling: uint8 codes (for tests of the codec)."""
    y = y.float().contiguous()
    codes = torch.empty(y.shape, dtype=torch.uint8, device=y.device)
    if y.numel():
        with launch_guard():
            _encode_kernel[(triton.cdiv(y.numel(), 4096),)](y, codes, y.numel(), BLOCK=4096)
    return codes


def decode_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 codes -> float32 through the kernel's decoder (for tests of the codec)."""
    codes = codes.contiguous()
    y = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    if codes.numel():
        with launch_guard():
            _decode_kernel[(triton.cdiv(codes.numel(), 4096),)](codes, y, codes.numel(), BLOCK=4096)
    return y
