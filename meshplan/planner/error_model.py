"""The relative error a compressed collective adds, measured against float32 on real data and fitted.

What is measured (by meshplan/measure/error_model.py), on the tiny model's own tensors (a seeded batch through
`build_model(tiny)`):
  move     data movement (all-to-all, all-gather): one encode/decode of the token activations entering the MoE
           layers (fp8: per-token scales, the forward's format; bf16: one cast). Fan-in 1.
  move_bwd the backward's FP8 all-gather: gradients w.r.t. the attention outputs, per-channel scales over 128
           tokens (compression.fp8_blocks).
  reduce   an activation reduce-scatter done as all-to-all + float32 sum (P -> S(i)): the n row-parallel partial
           sums of each attention's output projection (its input's columns split n ways), each encoded once.
  grad     the BF16 gradient reduction (data_parallel.py): n micro-batches' float32 gradients, each cast once,
           summed in float32, the sum cast once more for the all-gather.
  grad_2level  the same over two axes (n/2 intra-node x 2): the intra-node fp32 partial sum is cast once more
           before the inter-node hop. The planner charges every bf16 gradient reduction the larger of the two.
Error of one collective: ||decoded result - float32 result||_F / ||float32 result||_F, over all tensors.

The closed form the planner uses: err(kind, dtype, n) = c · n^a, fitted by least squares on log err over
n in FAN_INS (a = 0 for the moves, whose fan-in is 1). Why a power law: n independent roundings of size ~u·|x_i|
add in quadrature, ~u·sqrt(n)·rms(x), while the sum grows between sqrt(n)·rms(x) (uncorrelated summands:
a ≈ 0) and n·rms(x) (aligned ones, like gradients of similar batches: a ≈ -1/2); the fit says which.
This module reads the fitted model; measuring and fitting live in meshplan/measure/error_model.py
(`python -m meshplan.measure.error_model` re-measures and rewrites configs/error_model.yaml).
"""
from __future__ import annotations

import functools
from pathlib import Path

import yaml

from ..resources import shipped

DEFAULT_PATH = shipped("error_model.yaml")
FAN_INS = (2, 4, 8, 16)
KINDS = ("move", "move_bwd", "reduce", "grad", "grad_2level")
# Planner collective kind -> measured kind. Reductions use the fan-in, moves do not.
PLANNER_KIND = {"all_to_all": "move", "all_gather": "move", "p2p": "move", "reduce_scatter": "reduce",
                "all_reduce": "reduce"}


# ---- the fitted model ----------------------------------------------------------------------------------------
@functools.cache
def load(path: str | None = None) -> dict:
    p = Path(path) if path else DEFAULT_PATH
    if not p.exists():
        raise FileNotFoundError(f"{p}: no measured error model; run `python -m meshplan.measure.error_model`")
    return yaml.safe_load(p.read_text())


def relative_error(kind: str, dtype: str, n: int, model: dict | None = None) -> float:
    """Expected relative error of one collective of measured `kind` in `dtype` with fan-in n."""
    if dtype == "fp32" or n <= 1:
        return 0.0
    m = (model or load())["fit"]
    if kind == "grad" and dtype == "fp8":
        dtype = "bf16"  # gradients never travel in fp8 (strategies.allowed_precisions)
    if kind == "grad" and "grad_2level" in m:  # the runtime's reduction may span two axes: the worse of the two
        return max(relative_error("grad", dtype, n, {"fit": {"grad": m["grad"]}}),
                   relative_error("grad_2level", dtype, n, {"fit": {"grad_2level": m["grad_2level"]}}))
    c, a = m[kind][dtype]["c"], m[kind][dtype]["a"]
    return c * (n ** a if kind in ("reduce", "grad", "grad_2level") else 1.0)
