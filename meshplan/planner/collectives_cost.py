"""What a collective costs: bytes each GPU sends, alpha-beta time on a two-level (NVLink / NIC) network,
wire bytes per precision, and the relative error a precision adds.

Volume convention: every collective is described by X, the bytes of the *whole logical tensor* it acts on over
its group of n ranks, and we count what one GPU *sends* (links are full duplex, so sent bytes set the time):
  all_gather     (each rank holds X/n, ends with X):        X·(n-1)/n
  reduce_scatter (each rank holds a partial X, ends X/n):    X·(n-1)/n
  all_reduce     (= reduce_scatter + all_gather):            2·X·(n-1)/n
  all_to_all     (each rank holds X/n, keeps 1/n of it):     X/n·(n-1)/n
So docs/reference.md's V_TP = 2·b·s·h·(n-1)/n is one all-gather plus one reduce-scatter of X = b·s·h, and
V_EP = 2·(k/n)·b·s·h·(n-1)/n is two all-to-alls of X = k·b·s·h (the routed token copies of the whole group).
For Ulysses SP our count is half the paper's Eq. 2 (see cost_model.py): a rank holding [b, s/n, h(1+2/m)] keeps
1/n of it and sends the rest, X/n·(n-1)/n with X = b·s·h(1+2/m); the out all-to-all sends b·s·h/n·(n-1)/n.

Hierarchy: a group of n ranks with l of them per node (l < n spans g = n/l nodes) runs ring collectives in two
levels (docs/reference.md, "Communication volumes", SP gradients: intra-node RS, inter-node RS/AG on 1/l of the data,
intra-node AG), and
all-to-alls send (l-1)/(n-1) of their traffic over NVLink and the rest over the NIC, concurrently.

Functions here work on floats and on sympy expressions alike (plain arithmetic, Max for concurrency).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from ..ir.strategies import PRECISION_BYTES
from . import error_model
from .cluster import Cluster

FP8_SCALE_BYTES = 4  # one fp32 scale per token row (docs/reference.md, "Communication compression": per-token scales)
# Fallback when no measured error model exists: unit roundoff 2^-p of a format with p significand bits (bf16 8,
# e4m3 4). fp32 is the reference the error budget is measured against, so it adds no error.
UNIT_ROUNDOFF = {"fp32": 0.0, "bf16": 2.0 ** -8, "fp8": 2.0 ** -4}
REDUCTIONS = ("reduce_scatter", "all_reduce")


@dataclass(frozen=True)
class Traffic:
    """What one GPU sends for one collective, split by link, and the latency-bound steps on each link."""
    intra_bytes: object  # float or sympy.Expr
    inter_bytes: object
    intra_steps: int
    inter_steps: int
    concurrent: bool = False  # all-to-all: both links at once (time is the max), rings run level after level

    @property
    def bytes(self):
        return self.intra_bytes + self.inter_bytes


NONE = Traffic(0, 0, 0, 0)


def traffic(kind: str, x, n: int, local: int) -> Traffic:
    """Bytes one GPU sends for `kind` over n ranks of which `local` share a node, on a tensor of X bytes."""
    if n <= 1 or kind in ("none", "slice"):
        return NONE
    l = max(1, min(local, n))
    g = n // l
    if kind == "p2p":
        return Traffic(0, x, 0, 1) if l < n else Traffic(x, 0, 1, 0)
    if kind == "all_to_all":
        per_peer = x / (n * n)
        return Traffic(per_peer * (l - 1), per_peer * (n - l), l - 1, n - l, concurrent=True)
    if kind in ("all_gather", "reduce_scatter"):
        return Traffic(x * (l - 1) / l, (x / l) * (g - 1) / g, l - 1, g - 1)
    if kind == "all_reduce":
        return Traffic(2 * x * (l - 1) / l, 2 * (x / l) * (g - 1) / g, 2 * (l - 1), 2 * (g - 1))
    raise ValueError(f"unknown collective kind {kind!r}")


def remote_nodes(experts: int, top_k: int, nodes: int) -> float:
    """Expected distinct other nodes one token's top-k experts (distinct, uniformly routed, experts split evenly
    over `nodes` nodes) live on: (g - 1) · (1 - C(E - E/g, k) / C(E, k))."""
    if nodes <= 1:
        return 0.0
    per_node = experts // nodes
    miss = math.comb(experts - per_node, top_k) / math.comb(experts, top_k)
    return (nodes - 1) * (1 - miss)


def dedup_dispatch_traffic(x, n: int, local: int, experts: int, top_k: int) -> Traffic:
    """EP dispatch (or combine) with DeepEP's hierarchical all-to-all (docs/reference.md#links): a token crosses
    the NIC once per destination node, to the GPU of its own local index there, which forwards the copies over
    NVLink. x: bytes of all routed copies of the group (collectives_cost convention, X = k·t·h·bytes)."""
    l = max(1, min(local, n))
    if l >= n:
        return traffic("all_to_all", x, n, local)
    g = n // l
    token = x / (top_k * n)  # bytes of one rank's tokens, each once
    inter = token * remote_nodes(experts, top_k, g)
    copies = x / n  # this rank's routed copies
    intra = copies * (l - 1) / n + copies * (n - l) / n * (l - 1) / l  # local peers + forwarding of arrivals
    return Traffic(intra, inter, l - 1, g - 1, concurrent=True)


def link_params(cluster: Cluster, kind: str):
    """(intra-node, inter-node) AlphaBeta of one collective kind: measured if calibrated, else nominal x
    efficiency."""
    eff = cluster.efficiency(kind)
    return cluster.intra_node.alpha_beta(kind, eff), cluster.inter_node.alpha_beta(kind, eff)


def comm_time(kind: str, t: Traffic, cluster: Cluster, symbolic: bool = False, links=None):
    """Alpha-beta time of one collective: steps x latency + bytes / achieved bandwidth, per link. `links`:
    link_params(cluster, kind), when the caller has it cached."""
    if t is NONE or (t.intra_steps == 0 and t.inter_steps == 0):
        return 0
    ab_in, ab_out = links or link_params(cluster, kind)
    intra = t.intra_steps * ab_in.latency + t.intra_bytes / ab_in.bandwidth if t.intra_steps else 0
    inter = t.inter_steps * ab_out.latency + t.inter_bytes / ab_out.bandwidth if t.inter_steps else 0
    if t.concurrent:
        return sympy.Max(intra, inter) if symbolic else max(intra, inter)
    return intra + inter


def wire_bytes(elems, rows, dtype: str):
    """Bytes of a tensor of `elems` values in `rows` token rows sent in `dtype` (fp8 adds a scale per row)."""
    return elems * PRECISION_BYTES[dtype] + (rows * FP8_SCALE_BYTES if dtype == "fp8" else 0)


def relative_error(kind: str, dtype: str, n: int) -> float:
    """Relative error one collective adds to the values it moves: the measured, fitted model of error_model.py
    (configs/error_model.yaml). Reductions are an all-to-all of encoded summands plus a float32 local sum
    (docs/reference.md, "Communication compression"), so each summand is rounded once, whatever n. Without a measured
    model: the format's unit roundoff u (round-to-nearest: half the spacing of the significand's last bit)."""
    if kind in ("none", "slice") or n <= 1 or dtype == "fp32":
        return 0.0
    try:
        return error_model.relative_error(error_model.PLANNER_KIND[kind], dtype, n)
    except FileNotFoundError:
        return UNIT_ROUNDOFF[dtype]


def grad_relative_error(dtype: str, group: int) -> float:
    """Gradient reduction in BF16: cast once, all-to-all, FP32 sum, BF16 all-gather (runtime/data_parallel.py)."""
    if group <= 1 or dtype == "fp32":
        return 0.0
    try:
        return error_model.relative_error("grad", dtype, group)
    except FileNotFoundError:
        return 2 * UNIT_ROUNDOFF[dtype]
