"""Compute kernels around MoE communication: FP8 quantisation, dispatch permute, combine
un-permute, and grouped expert GEMMs.

Every op has a public torch reference (`*_ref`, used by the runtime on CPU and for training)
and a Triton kernel (in `*_triton.py`). Public ops take backend="auto" | "triton" | "torch";
"auto" runs Triton for CUDA tensors. This package does not import triton: the `*_triton`
modules are imported on first use of the Triton backend (see _backend.py for why).
"""

from ._backend import resolve_backend, triton_available
from .fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8, dequantize_fp8_ref, quantize_fp8, quantize_fp8_ref
from .grouped_gemm import expert_ffn, grouped_gemm, grouped_gemm_ref, grouped_swiglu, grouped_swiglu_ref
from .moe_permute import DispatchIndex, PermuteResult, dispatch_index, permute, permute_rows_ref
from .moe_unpermute import unpermute, unpermute_ref

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "DispatchIndex", "PermuteResult",
    "dequantize_fp8", "dequantize_fp8_ref", "dispatch_index", "expert_ffn", "grouped_gemm",
    "grouped_gemm_ref", "grouped_swiglu", "grouped_swiglu_ref", "permute", "permute_rows_ref",
    "quantize_fp8", "quantize_fp8_ref", "resolve_backend", "triton_available", "unpermute",
    "unpermute_ref",
]
