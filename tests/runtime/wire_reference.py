"""The wire formats written from their definitions in numpy (no torch casts), shared by the codec tests.

E4M3 and bf16 as docs/reference.md ("Number formats on the wire") defines them: E4M3 has 3 mantissa bits,
exponents -6..8, subnormals 2^-9 apart, largest 448; bf16 is the top 16 bits of a float32; both round to
nearest, ties to even. The fp8 layouts as docs/reference.md ("Communication compression") describes them: one
float32 scale amax / 448 per token row ("row"), or per channel per group of 128 tokens ("block").
"""
import numpy as np

BLOCK_TOKENS = 128


def e4m3(y: np.ndarray) -> np.ndarray:
    """Round float values to the E4M3 grid (saturating at +-448, as the codec clamps before the cast)."""
    y = np.clip(y.astype(np.float64), -448.0, 448.0)
    a = np.abs(y)
    exp = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    quantum = 2.0 ** (np.maximum(exp, -6) - 3)  # 8 steps per binade; the subnormal step 2^-9 below 2^-6
    return np.round(y / quantum) * quantum  # np.round: half to even


def bf16(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def fp8_rows_reference(x: np.ndarray) -> np.ndarray:
    """One float32 scale per row, amax / 448; codes = E4M3(x / scale) with the division in float32."""
    amax = np.maximum(np.abs(x).max(-1, keepdims=True), 2.0 ** -100).astype(np.float32)  # zero rows: 0 / s = 0
    scale = (amax / np.float32(448.0)).astype(np.float32)
    return (e4m3((x / scale).astype(np.float32)) * scale).astype(np.float32)


def fp8_blocks_reference(x: np.ndarray) -> np.ndarray:
    """x [T, C]: one float32 scale per channel per group of 128 consecutive rows, amax / 448."""
    out = np.empty_like(x, dtype=np.float32)
    for lo in range(0, x.shape[0], BLOCK_TOKENS):
        out[lo:lo + BLOCK_TOKENS] = fp8_rows_reference(x[lo:lo + BLOCK_TOKENS].T).T
    return out
