"""Gradient synchronisation once per step: what the data-parallel reduction and the parameter all-gather cost.

Two schemes (docs/reference.md#baselines):
  * without ZeRO (Options.zero False; runtime/data_parallel.py): fp32, an all-reduce of the float32 gradients; a
  compressed
    format, the gradients cast once, an all-to-all of the shards (summed in float32), an all-gather of the reduced
    shards, each in the wire format, plus the conversions as HBM traffic. All of it after the last backward.
  * with ZeRO-1, the optimizer state sharded as memory.py prices it (Megatron's distributed optimizer,
    Options.zero, the default): a reduce-scatter of the gradients in the grad
    precision (fp32 by default: 4 B per parameter; the all-to-all of BF16 shards for MegaScale's BF16 exchange,
    2 B), then, after the sharded optimizer step, an all-gather of the updated BF16 parameters (2 B per parameter)
    that overlaps the next step's first forward (--overlap-param-gather).
Groups reduce innermost level first, as the runtime does axis by axis: inside the node over l ranks, then across
nodes over n/l ranks on the 1/l left (collectives_cost.traffic).
"""
from __future__ import annotations

from . import collectives_cost as cc

PARAM_DTYPE = "bf16"


def reduce_time(cm, elems, n: int, local: int, dtype: str) -> float:
    """Seconds to reduce `elems` gradients over n ranks (`local` per node) in `dtype`; cm: a pricing.CostModel."""
    size = cc.PRECISION_BYTES[dtype]
    if not elems or n <= 1:
        return 0.0  # nothing to reduce: no collective
    dist = cm.opt.zero
    if dtype == "fp32":
        return cm._time("reduce_scatter" if dist else "all_reduce", elems * size, n, local)
    cl = cm.cluster
    codec = 2 * elems * (cc.PRECISION_BYTES["fp32"] + size) / (cl.hbm_bandwidth * cl.codec(dtype))
    # all_to_all's X is the group's whole tensor (each rank scatters all of its part); without the distributed
    # optimizer the all-gathers return the reduced shards in the same two levels.
    l = max(1, min(local, n))
    t = 0.0
    for ranks, part, loc in ((l, elems, l), (n // l, elems / l, 1)):
        if ranks > 1:
            t += cm._time("all_to_all", ranks * part * size, ranks, loc)
            if not dist:
                t += cm._time("all_gather", part * size, ranks, loc)
    return t + codec


def param_gather_time(cm, elems, n: int, local: int) -> float:
    """The distributed optimizer's all-gather of `elems` updated BF16 parameters over n ranks."""
    if not elems or n <= 1:
        return 0.0
    return cm._time("all_gather", elems * cc.PRECISION_BYTES[PARAM_DTYPE], n, local)
