"""Kernel-level compute time on one GPU (docs/reference.md#kernels): what an op's GEMMs, attention core and
memory-bound kernels cost, given a cluster's KernelModel.

GEMM [m, k] x [k, n]: its m x n output is cut into tiles (cluster.kernels.tile); the SMs compute one tile each per
wave, so the time is ceil(tiles / SMs) waves of a full tile's FLOPs at the measured per-wave efficiency. A grouped
GEMM (one launch for `count` experts) pools its tiles into the same waves. Training runs each GEMM three times with
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


def gemm_seconds(count: float, m: float, k: float, n: float, kern, peak: float) -> float:
    """One (grouped) GEMM of `count` [m, k] x [k, n] products: waves of output tiles, the better of the two tile
    orientations (cuBLAS picks its tile by shape)."""
    if count <= 0 or m <= 0 or k <= 0 or n <= 0:
        return 0.0
    a, b = kern.tile
    per_sm = peak * kern.gemm_efficiency / kern.sm_count  # FLOP/s one SM sustains inside a full wave
    best = math.inf
    for tm, tn in ((a, b), (b, a)):
        tiles = math.ceil(count) * math.ceil(m / tm) * math.ceil(n / tn)
        best = min(best, math.ceil(tiles / kern.sm_count) * 2 * tm * tn * k / per_sm)
    return best


def gemm_train_seconds(count: float, m: float, k: float, n: float, kern, peak: float) -> float:
    """Forward, input-gradient and weight-gradient GEMMs of one [m, k] x [k, n] layer."""
    return (gemm_seconds(count, m, k, n, kern, peak) + gemm_seconds(count, m, n, k, kern, peak)
            + gemm_seconds(count, k, m, n, kern, peak))


def split(parts):
    """(gemm FLOPs, gemm seconds) of flattened (count, m, k, n) groups."""
    return [tuple(parts[i:i + 4]) for i in range(0, len(parts), 4)]


def train_seconds(flops: float, hbm_bytes: float, attn_flops: float, launches: float, gemms: list, cluster) -> dict:
    """Seconds of forward + backward on one GPU per micro-batch, by kind: gemm, attention, memory (memory-bound
    kernels and any FLOPs outside GEMMs and attention at peak), launch."""
    kern, peak = cluster.kernels, cluster.peak_flops
    gemm = sum(gemm_train_seconds(c, m, k, n, kern, peak) for c, m, k, n in gemms)
    gemm_flops = sum(2 * c * m * k * n for c, m, k, n in gemms)
    attention = attn_flops / (peak * kern.attention_forward) + \
        FA_BACKWARD_FLOPS * attn_flops / (peak * kern.attention_backward)
    rest = max(0.0, flops - gemm_flops - attn_flops)
    memory = 3 * rest / peak + 3 * hbm_bytes / (cluster.hbm_bandwidth * kern.memory_efficiency)
    return {"gemm": gemm, "attention": attention, "memory": memory, "launch": 3 * launches * kern.launch_s}
