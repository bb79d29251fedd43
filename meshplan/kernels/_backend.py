"""Which implementation a kernel call runs: the Triton kernel or its torch reference.

Triton is imported lazily, only when a call resolves to the Triton backend, so that
`import meshplan` works where Triton is missing (it ships for Linux x86_64 only) and so
that tests can set TRITON_INTERPRET=1 before Triton reads it (it does at `@triton.jit`
decoration time, i.e. when a `*_triton.py` module is first imported).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, tensor: torch.Tensor, op: str) -> str:
    """Map "auto" | "triton" | "torch" to the implementation that will run.

    "auto" picks Triton for CUDA tensors (when Triton is installed), the torch reference
    otherwise; the environment variable MESHPLAN_KERNELS=torch|triton|auto overrides what
    "auto" means for the whole process (how tests and benchmarks run the runtime on either
    path). "triton" is honoured or refused with the reason; it runs on CPU tensors only
    under TRITON_INTERPRET=1.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("MESHPLAN_KERNELS", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{op}: MESHPLAN_KERNELS={backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"{op}: backend='triton' but triton is not installed "
                           "(it is published for Linux x86_64); use backend='torch'")
    if not tensor.is_cuda and not triton_interpret():
        raise RuntimeError(f"{op}: backend='triton' with a {tensor.device} tensor needs a CUDA "
                           "device, or TRITON_INTERPRET=1 set before triton is first imported")
    return "triton"


_INTERPRETER_LOCK = threading.RLock()


def launch_guard():
    """Wrap every kernel launch. Triton's CPU interpreter patches triton.language module-wide for the duration
    of a launch, so two threads interpreting kernels at once (the ranks of an in-process world) corrupt each
    other: under TRITON_INTERPRET=1 launches take a process-wide lock. Compiled launches take none."""
    return _INTERPRETER_LOCK if triton_interpret() else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
