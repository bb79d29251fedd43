"""Which parallel strategies each op kind admits, as data every stage shares: one Strategy object per (op kind,
strategy) (base.py; one file per op kind), the registry (registry.py) and the checks on pairs (checks.py)."""
from .base import (
    BATCH,
    COMBINE,
    COMPUTE,
    CORE,
    COUNTS,
    DISPATCH,
    EXPERTS,
    GRAD,
    IDS,
    OUT_A2A,
    OUT_PROJ,
    PRECISION_BYTES,
    PRECISIONS,
    QKV,
    QKV_A2A,
    ROUTE,
    SEQ,
    SHARED,
    UNPERMUTE,
    PhaseSpec,
    Strategy,
)
from .checks import (
    allowed_precisions,
    batch_parallel_error,
    collective_names,
    default_strategy,
    divisibility_error,
    layout_error,
    native_io,
    offered_error,
    transition,
)
from .registry import DEFAULT_STRATEGY, STRATEGIES, strategy_of

__all__ = ["BATCH", "COMBINE", "COMPUTE", "CORE", "COUNTS", "DISPATCH", "EXPERTS", "GRAD", "IDS", "OUT_A2A",
           "OUT_PROJ", "PRECISION_BYTES", "PRECISIONS", "QKV", "QKV_A2A", "ROUTE", "SEQ", "SHARED", "UNPERMUTE",
           "PhaseSpec", "Strategy", "allowed_precisions", "batch_parallel_error", "collective_names",
           "default_strategy", "divisibility_error", "layout_error", "native_io", "offered_error", "transition",
           "DEFAULT_STRATEGY", "STRATEGIES", "strategy_of"]
