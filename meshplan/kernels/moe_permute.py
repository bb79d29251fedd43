"""MoE dispatch permute: route each (token, top-k slot) pair to a contiguous row of the
dispatch buffer, grouped by destination expert, optionally FP8-quantised in the same pass.

Order of the buffer. The T*k pairs are sorted by expert id, stably, so inside one expert
the rows keep this rank's token order. Experts are owned contiguously by the EP ranks (rank r
holds experts [r*experts_per_rank, (r+1)*experts_per_rank)), so the buffer splits into R =
num_experts / experts_per_rank contiguous chunks, one per destination rank, of
`split_sizes[r]` rows: exactly the input split of an all-to-all. MegaScale-MoE's "sorted by
expert, then by source rank" order (docs/reference.md, "Overlap") is what the *receiver* sees:
the all-to-all concatenates what each source rank sent in rank order, so after it every
expert's rows from rank 0 precede those from rank 1, and so on.

Only the index computation (a stable argsort and a histogram) is torch; moving the rows,
plus quantisation, is one Triton kernel that reads every token's activations once and
writes its k copies. Rows of x are quantised with per-token scales, so quantise-then-copy
equals copy-then-quantise and the k copies of a token share one scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import resolve_backend
from .fp8 import FP8_DTYPE, quantize_fp8_ref


@dataclass
class PermuteResult:
    """The dispatch buffer and the maps needed to send it and to undo it.

    buf:               [T*k, H] rows in dispatch order; x.dtype, or float8_e4m3fn if quantised
    scales:            [T*k] float32 per-row scales when quantised, else None
    row_id_map:        [T, k] int64, row of buf holding the pair (token t, slot j)
    sorted_token_idx:  [T*k] int64, source token of every row of buf
    tokens_per_expert: [E] int64
    split_sizes:       [R] int64 rows of buf per destination EP rank (.tolist() for all_to_all)
    """

    buf: torch.Tensor
    scales: torch.Tensor | None
    row_id_map: torch.Tensor
    sorted_token_idx: torch.Tensor
    tokens_per_expert: torch.Tensor
    split_sizes: torch.Tensor


@dataclass
class DispatchIndex:
    row_id_map: torch.Tensor
    sorted_token_idx: torch.Tensor
    tokens_per_expert: torch.Tensor
    split_sizes: torch.Tensor


def dispatch_index(topk_idx: torch.Tensor, num_experts: int,
                   experts_per_rank: int | None = None) -> DispatchIndex:
    """The dispatch order for topk_idx [T, k] (expert ids in [0, num_experts))."""
    if topk_idx.dim() != 2:
        raise ValueError(f"permute: topk_idx must be [T, k], got shape {tuple(topk_idx.shape)}")
    if topk_idx.dtype.is_floating_point or topk_idx.dtype == torch.bool:
        raise TypeError(f"permute: topk_idx must hold integer expert ids, got {topk_idx.dtype}")
    epr = num_experts if experts_per_rank is None else experts_per_rank
    if num_experts <= 0 or epr <= 0 or num_experts % epr:
        raise ValueError(f"permute: experts_per_rank={epr} does not divide num_experts={num_experts}")
    T, k = topk_idx.shape
    flat = topk_idx.reshape(-1).long()
    if flat.numel():
        lo, hi = (int(v) for v in torch.aminmax(flat))  # the one host sync: a bad id would corrupt memory
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"permute: topk_idx holds expert ids in [{lo}, {hi}], "
                             f"outside [0, {num_experts})")
    # Stable sort: within one expert, rows stay in (token, slot) order.
    order = torch.argsort(flat, stable=True)
    row_of_pair = torch.empty_like(order)
    row_of_pair[order] = torch.arange(order.numel(), device=order.device)
    # A scatter-add rather than bincount, whose CUDA kernel syncs with the host to size its output.
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))
    return DispatchIndex(
        row_id_map=row_of_pair.view(T, k),
        sorted_token_idx=order // k,
        tokens_per_expert=tokens_per_expert,
        split_sizes=tokens_per_expert.view(num_experts // epr, epr).sum(dim=1),
    )


def permute_rows_ref(x: torch.Tensor, index: DispatchIndex,
                     quantize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Torch reference for the row movement: buf[p] = x[sorted_token_idx[p]]."""
    if not quantize:
        return x[index.sorted_token_idx], None
    q, scale = quantize_fp8_ref(x)  # per-token scales: quantising before the copy is the same
    return q[index.sorted_token_idx], scale[index.sorted_token_idx]


def permute(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, *,
            experts_per_rank: int | None = None, quantize: bool = False,
            backend: str = "auto") -> PermuteResult:
    """Build the expert-sorted dispatch buffer for x [T, H] routed by topk_idx [T, k].

    experts_per_rank defaults to num_experts (a single EP rank). With quantize=True the buffer
    is float8_e4m3fn with per-row float32 scales (see fp8.py).
    """
    if x.dim() != 2 or x.shape[0] != topk_idx.shape[0]:
        raise ValueError(f"permute: x {tuple(x.shape)} and topk_idx {tuple(topk_idx.shape)} "
                         "must be [T, H] and [T, k]")
    index = dispatch_index(topk_idx, num_experts, experts_per_rank)
    if resolve_backend(backend, x, "permute") == "torch":
        buf, scales = permute_rows_ref(x, index, quantize)
    else:
        from . import moe_permute_triton

        T, H = x.shape
        rows = topk_idx.numel()
        buf = torch.empty((rows, H), dtype=FP8_DTYPE if quantize else x.dtype, device=x.device)
        scales = torch.empty(rows, dtype=torch.float32, device=x.device) if quantize else None
        moe_permute_triton.permute_into(x, index.row_id_map, buf, scales)
    return PermuteResult(buf, scales, index.row_id_map, index.sorted_token_idx,
                         index.tokens_per_expert, index.split_sizes)
