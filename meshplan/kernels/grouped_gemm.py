"""Grouped expert GEMMs over variable-size, expert-sorted token segments (SwiGLU expert FFN).

Rows of x [N, H] are sorted by local expert (the receive buffer after dispatch), with
tokens_per_expert [E] rows per expert (zeros allowed; sum = N). For every expert e and its
segment x_e:

    h_e = silu(x_e @ w1[e].T) * (x_e @ w3[e].T)      w1, w3: [E, F, H]   (grouped_swiglu)
    y_e = h_e @ w2[e].T                                w2:     [E, H, F]   (grouped_gemm)

The Triton path fuses the SwiGLU into the first GEMM's epilogue, so the two [N, F]
projections never reach memory. It has no autograd: the runtime trains on CPU through the
torch reference, which is plain differentiable torch; the Triton path is for inference and
for GPU timing. Both accumulate in float32 (the reference through torch's matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve_backend


def _check(x, ws, tokens_per_expert, op):
    E = ws[0].shape[0]
    if x.dim() != 2 or any(w.dim() != 3 or w.shape[0] != E for w in ws):
        raise ValueError(f"{op}: expected x [N, K] and weights [E, out, K]; got x {tuple(x.shape)}, "
                         f"weights {[tuple(w.shape) for w in ws]}")
    if any(w.shape[2] != x.shape[1] for w in ws):
        raise ValueError(f"{op}: x has {x.shape[1]} columns but weights expect {ws[0].shape[2]}")
    if tokens_per_expert.shape != (E,):
        raise ValueError(f"{op}: tokens_per_expert must be [{E}] (one count per local expert), "
                         f"got {tuple(tokens_per_expert.shape)}")
    total = int(tokens_per_expert.sum())  # host sync; a wrong total would read out of bounds
    if total != x.shape[0] or (tokens_per_expert.numel() and int(tokens_per_expert.min()) < 0):
        raise ValueError(f"{op}: tokens_per_expert {tokens_per_expert.tolist()} must be "
                         f">= 0 and sum to the {x.shape[0]} rows of x")


def _segments(x: torch.Tensor, tokens_per_expert: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(x, tokens_per_expert.tolist()))


def grouped_swiglu_ref(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                       tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Torch reference for grouped_swiglu; differentiable."""
    _check(x, (w1, w3), tokens_per_expert, "grouped_swiglu")
    outs = [F.silu(xe @ w1[e].T) * (xe @ w3[e].T) for e, xe in enumerate(_segments(x, tokens_per_expert))]
    return torch.cat(outs) if outs else x.new_empty((0, w1.shape[1]))


def grouped_gemm_ref(h: torch.Tensor, w2: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Torch reference for grouped_gemm; differentiable."""
    _check(h, (w2,), tokens_per_expert, "grouped_gemm")
    outs = [he @ w2[e].T for e, he in enumerate(_segments(h, tokens_per_expert))]
    return torch.cat(outs) if outs else h.new_empty((0, w2.shape[1]))


def grouped_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                   tokens_per_expert: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """h [N, F]: per expert segment, silu(x_e @ w1[e].T) * (x_e @ w3[e].T)."""
    if resolve_backend(backend, x, "grouped_swiglu") == "torch":
        return grouped_swiglu_ref(x, w1, w3, tokens_per_expert)
    _check(x, (w1, w3), tokens_per_expert, "grouped_swiglu")
    from . import grouped_gemm_triton

    out = torch.empty((x.shape[0], w1.shape[1]), dtype=x.dtype, device=x.device)
    grouped_gemm_triton.grouped_gemm_into(x, w1, w3, tokens_per_expert, out)
    return out


def grouped_gemm(h: torch.Tensor, w2: torch.Tensor, tokens_per_expert: torch.Tensor,
                 backend: str = "auto") -> torch.Tensor:
    """y [N, H]: per expert segment, h_e @ w2[e].T."""
    if resolve_backend(backend, h, "grouped_gemm") == "torch":
        return grouped_gemm_ref(h, w2, tokens_per_expert)
    _check(h, (w2,), tokens_per_expert, "grouped_gemm")
    from . import grouped_gemm_triton

    out = torch.empty((h.shape[0], w2.shape[1]), dtype=h.dtype, device=h.device)
    grouped_gemm_triton.grouped_gemm_into(h, w2, None, tokens_per_expert, out)
    return out


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
               tokens_per_expert: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The whole SwiGLU expert FFN on expert-sorted rows: grouped_swiglu then grouped_gemm."""
    h = grouped_swiglu(x, w1, w3, tokens_per_expert, backend)
    return grouped_gemm(h, w2, tokens_per_expert, backend)
