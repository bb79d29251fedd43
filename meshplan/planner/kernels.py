"""Kernel-level compute time on one GPU (docs/reference.md#kernels): what an op's GEMMs, attention core and
memory-bound kernels cost, given a cluster's KernelModel.

GEMM [m, k] x [k, n]: its m x n output is cut into tiles (cluster.kernels.tile); the SMs compute one tile each per
wave, so the time is ceil(tiles / SMs) waves of a full tile's FLOPs at the measured per-wave efficiency. A grouped
GEMM (one launch for `count` experts) pools its tiles into the same waves. Routed rows are ragged: each expert's
row count is a random variable, so its last row tile is on average half empty (count/2 tiles more than the mean
rows need), whatever the mean. Training runs each GEMM three times with
different outputs: forward m x n, input gradient m x k (reduced over n), weight gradient k x n (reduced over m), so
narrow and short GEMMs (TP-split experts, few tokens per expert) pay their wave quantisation three ways.

FlashAttention: forward at its own efficiency; backward does 2.5x the forward's FLOPs (QK^T recomputed, then five
GEMMs instead of two) at the backward efficiency. Memory-bound kernels (permute/unpermute, SwiGLU, softmax/top-k,
RoPE, norms) move their bytes at the measured share of HBM bandwidth; forward + backward = 3x the forward's bytes
(cost_model.py). Every kernel pays a fixed launch cost; backward launches twice as many as forward.
"""
from __future__ import annotations

import math

FA_BACKWARD_FLOPS = 2.5  # backward / forward FLOPs of FlashAttention (docs/reference.md#kernels)


def _tiles(count: float, x: float, t: int, ragged: bool) -> float:
    """Row tiles of `count` experts of x rows each (ragged: routed rows, half a tile wasted per expert)."""
    return math.ceil(count * x / t + count / 2) if ragged else math.ceil(count) * math.ceil(x / t)


def gemm_seconds(count: float, m: float, k: float, n: float, kern, peak: float, ragged: bool = False) -> float:
    """One (grouped) GEMM of `count` [m, k] x [k, n] products: waves of output tiles, the better of the two tile
    orientations (cuBLAS picks its tile by shape). ragged: m is a routed (random) row count per expert."""
    if count <= 0 or m <= 0 or k <= 0 or n <= 0:
        return 0.0
    a, b = kern.tile
    per_sm = peak * kern.gemm_efficiency / kern.sm_count  # FLOP/s one SM sustains inside a full wave
    best = math.inf
    for tm, tn in ((a, b), (b, a)):
        tiles = _tiles(count, m, tm, ragged) * math.ceil(n / tn)
        best = min(best, math.ceil(tiles / kern.sm_count) * 2 * tm * tn * k / per_sm)
    return best


def gemm_backward_seconds(count: float, m: float, k: float, n: float, kern, peak: float,
                          ragged: bool = False) -> float:
    """Input-gradient and weight-gradient GEMMs of one [m, k] x [k, n] layer (the weight gradient reduces over
    the ragged rows: its output k x n per expert is whole)."""
    wgrad = math.ceil(count) * math.ceil(k / kern.tile[0]) * math.ceil(n / kern.tile[1])
    per_sm = peak * kern.gemm_efficiency / kern.sm_count
    w = math.ceil(wgrad / kern.sm_count) * 2 * kern.tile[0] * kern.tile[1] * m / per_sm if ragged else \
        gemm_seconds(count, k, m, n, kern, peak)
    return gemm_seconds(count, m, n, k, kern, peak, ragged) + w


def gemm_train_seconds(count: float, m: float, k: float, n: float, kern, peak: float, ragged: bool = False) -> float:
    """Forward, input-gradient and weight-gradient GEMMs of one [m, k] x [k, n] layer."""
    return gemm_seconds(count, m, k, n, kern, peak, ragged) + gemm_backward_seconds(count, m, k, n, kern, peak, ragged)


def split(parts):
    """(count, m, k, n, ragged) groups from their flattened values."""
    return [tuple(parts[i:i + 5]) for i in range(0, len(parts), 5)]


def fp8_cast_bytes(gemms: list) -> float:
    """HBM bytes of casting each GEMM's activation operands to FP8 per training step (read 2 B, write 1 B per
    value): the input for the forward and again (transposed) for the weight gradient, the output gradient for the
    input gradient. Weights are cast once per step (negligible next to activations at these token counts)."""
    return sum(3 * c * m * (2 * k + n) for c, m, k, n, _ in gemms)


def train_seconds(flops: float, hbm_bytes: float, attn_flops: float, launches: float, gemms: list, cluster,
                  fp8: bool = False) -> dict:
    """Seconds of forward + backward on one GPU per micro-batch, by kind: gemm, attention, memory (memory-bound
    kernels and any FLOPs outside GEMMs and attention at peak), launch. fp8: GEMMs on FP8 tensor cores (the
    per-wave efficiency of BF16 applied to the FP8 peak, docs/reference.md#kernels), operands cast in HBM."""
    kern, peak = cluster.kernels, cluster.peak_flops
    gemm_peak = peak * (kern.fp8_speedup if fp8 else 1.0)
    gemm = sum(gemm_train_seconds(c, m, k, n, kern, gemm_peak, bool(r)) for c, m, k, n, r in gemms)
    gemm_flops = sum(2 * c * m * k * n for c, m, k, n, _ in gemms)
    if fp8:
        hbm_bytes = hbm_bytes + fp8_cast_bytes(gemms) / 3  # memory below counts 3x the forward's bytes
    attention = attn_flops / (peak * kern.attention_forward) + \
        FA_BACKWARD_FLOPS * attn_flops / (peak * kern.attention_backward)
    rest = max(0.0, flops - gemm_flops - attn_flops)
    memory = 3 * rest / peak + 3 * hbm_bytes / (cluster.hbm_bandwidth * kern.memory_efficiency)
    return {"gemm": gemm, "attention": attention, "memory": memory, "launch": 3 * launches * kern.launch_s}


def pass_seconds(flops: float, hbm_bytes: float, gemm: tuple, cluster, backward: bool,
                 attention: bool = False) -> float:
    """Seconds of ONE pass (forward, or backward = 2x the forward's FLOPs and bytes) of a piece of an op on one GPU,
    for a schedule's tasks (codegen/durations.py): the same kernel model as train_seconds, split by pass.
    gemm: the piece's main GEMM (m, k, n); its FLOPs are counted as that many such GEMMs (a grouped GEMM over
    local experts pools their tiles into waves). FLOPs beyond them run at one full wave's efficiency (attention's
    core at FlashAttention's forward/backward efficiency); bytes at the memory-bound kernels' share of HBM; one
    launch (two in backward)."""
    kern, peak = cluster.kernels, cluster.peak_flops
    gemm_time, gemm_flops = 0.0, 0.0
    if gemm and all(x > 0 for x in gemm):
        m, k, n = gemm
        count = flops / (2 * m * k * n) / (2 if backward else 1)  # how many forward GEMMs of this shape
        gemm_flops = flops
        gemm_time = (gemm_backward_seconds(count, m, k, n, kern, peak) if backward
                     else gemm_seconds(count, m, k, n, kern, peak))
    if attention:
        rest_eff = kern.attention_backward if backward else kern.attention_forward
    else:
        rest_eff = kern.gemm_efficiency
    rest_flops = max(0.0, flops - gemm_flops)
    if attention and backward:  # FlashAttention's backward does 2.5x, not 2x, the forward's FLOPs
        rest_flops *= FA_BACKWARD_FLOPS / 2
    rest = rest_flops / (peak * rest_eff)
    memory = hbm_bytes / (cluster.hbm_bandwidth * kern.memory_efficiency)
    return gemm_time + rest + memory + (2 if backward else 1) * kern.launch_s
