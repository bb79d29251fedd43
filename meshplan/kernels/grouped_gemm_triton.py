"""Triton grouped GEMM for expert segments (see grouped_gemm.py). Importing it imports triton.

Scheduling. Every expert segment is cut into ceil(n_e / BLOCK_M) row tiles; a program owns
one row tile and one BLOCK_N block of output columns, so a tile never straddles two experts
and partial tiles are masked. Programs are numbered in groups of GROUP_M row tiles that walk
every column block together (the Triton matmul tutorial's swizzle): the programs resident at
once share a few x tiles and a few weight blocks through L2. Numbered row tile fastest (GROUP_M
huge), every column block re-reads all of x from memory: on an H200 that ran at 60% of a dense
cuBLAS GEMM (benchmarks/kernels_gpu.py, 2026-11-25). The tile -> (expert, rows) table is
built with torch ops on the device (cumsum + searchsorted), with no host sync: the grid is
sized for the upper bound ceil(N / BLOCK_M) + E tiles and the spare programs find an empty
row range and return.
Empty experts simply own no tiles.

With W3 given, each program computes two accumulators, x @ w1[e].T and x @ w3[e].T, over
the same loaded x tile and applies silu(a) * b in float32 before the single store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import launch_guard, triton_interpret


def default_config(dtype: torch.dtype, swiglu: bool) -> dict:
    """bf16/fp16: the fastest of benchmarks/kernels_gpu.py's GEMM_CONFIGS on an H200 (2026-11-25, 16,384 rows,
    H=4096, F=14336, 4 experts): SwiGLU 128x128x64 tiles 540 TFLOP/s (two 128x128 accumulators; 128x64: 494),
    second GEMM 128x256x64 575 TFLOP/s (128x128: 500); 8 warps, 3 stages, groups of 8 row tiles. float32 runs
    IEEE FMA dots (no tensor cores), so smaller tiles; untuned."""
    if dtype == torch.float32:
        return dict(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2, group_m=8)
    return dict(block_m=128, block_n=128 if swiglu else 256, block_k=64, num_warps=8, num_stages=3, group_m=8)


@triton.jit
def _grouped_gemm_kernel(x_ptr, w1_ptr, w3_ptr, out_ptr, tile_expert_ptr, tile_start_ptr,
                         tile_end_ptr, N_TILES, N_OUT, K, stride_x, stride_we, stride_wn, stride_out,
                         SWIGLU: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N_OUT, BLOCK_N)
    per_group = GROUP_M * n_blocks
    first_tile = (pid // per_group) * GROUP_M
    group_size = tl.minimum(N_TILES - first_tile, GROUP_M)
    tile = first_tile + (pid % per_group) % group_size
    col_block = (pid % per_group) // group_size
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    if row_start >= row_end:  # a spare tile of the upper-bound grid
        return
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N_OUT
    ks = tl.arange(0, BLOCK_K)
    # x tile [BLOCK_M, BLOCK_K]; weight tiles are read transposed, [BLOCK_K, BLOCK_N] of w[e].T
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x + ks[None, :]
    w_offs = expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        b1 = tl.load(w1_ptr + w_offs + k0, mask=w_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b1 = b1.to(tl.float32)
        acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
        if SWIGLU:
            b3 = tl.load(w3_ptr + w_offs + k0, mask=w_mask, other=0.0)
            if UPCAST:
                b3 = b3.to(tl.float32)
            acc3 = tl.dot(a, b3, acc3, input_precision=PRECISION)
    if SWIGLU:
        out = acc1 * tl.sigmoid(acc1) * acc3
    else:
        out = acc1
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def tile_table(tokens_per_expert: torch.Tensor, num_rows: int, block_m: int):
    """(expert, row_start, row_end) int32 per row tile, padded to a sync-free upper bound."""
    dev = tokens_per_expert.device
    counts = tokens_per_expert.to(torch.int64)
    E = counts.numel()
    ends = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m
    tile_ends = torch.cumsum(tiles, 0)
    num_tiles = triton.cdiv(num_rows, block_m) + E  # >= sum_e ceil(n_e / block_m)
    tid = torch.arange(num_tiles, device=dev)
    expert = torch.searchsorted(tile_ends, tid, right=True)  # == E for spare tiles
    e = expert.clamp(max=max(E - 1, 0))
    start = ends[e] - counts[e] + (tid - (tile_ends[e] - tiles[e])) * block_m
    end = torch.minimum(start + block_m, ends[e])
    spare = expert >= E
    start = torch.where(spare, 0, start)
    end = torch.where(spare, 0, end)
    return e.int(), start.int(), end.int()


def grouped_gemm_into(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None,
                      tokens_per_expert: torch.Tensor, out: torch.Tensor, **config) -> None:
    """out = per-segment x_e @ w1[e].T, or silu(x_e @ w1[e].T) * (x_e @ w3[e].T) if w3 is given.

    config overrides default_config's keys (block_m, block_n, block_k, num_warps, num_stages, group_m).
    """
    N, K = x.shape
    E, n_out, _ = w1.shape
    swiglu = w3 is not None
    if any(w.dtype != x.dtype for w in (w1, w3) if w is not None):
        raise TypeError(f"grouped gemm: weights must match the activations' dtype {x.dtype}")
    x, w1 = x.contiguous(), w1.contiguous()
    w3 = w3.contiguous() if swiglu else w1  # unused when not swiglu
    assert out.shape == (N, n_out) and out.stride(-1) == 1
    if N == 0 or E == 0:
        return
    cfg = {**default_config(x.dtype, swiglu), **config}
    expert, start, end = tile_table(tokens_per_expert.to(x.device), N, cfg["block_m"])
    # float32 inputs get full-precision dots; tf32 would cost ~1e-3 relative error.
    # The CPU interpreter's tl.dot multiplies bf16/fp16 operands' raw bit patterns (triton
    # 3.9), so there the tiles are widened to float32 first: the same exact products and
    # float32 sums the tensor cores compute.
    upcast = x.dtype != torch.float32 and triton_interpret()
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"
    grid = (expert.numel() * triton.cdiv(n_out, cfg["block_n"]),)
    with launch_guard():
        _grouped_gemm_kernel[grid](x, w1, w3, out, expert, start, end, expert.numel(), n_out, K,
                                   x.stride(0), w1.stride(0), w1.stride(1), out.stride(0),
                                   SWIGLU=swiglu, PRECISION=precision, UPCAST=upcast,
                                   BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                                   GROUP_M=cfg["group_m"],
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
