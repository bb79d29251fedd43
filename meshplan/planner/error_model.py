"""The relative error a compressed collective adds, measured against float32 on real data and fitted.

What is measured (`measure`), on the tiny model's own tensors (a seeded batch through `build_model(tiny)`):
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
`python -m meshplan.planner.error_model` re-measures and rewrites configs/error_model.yaml.
"""
from __future__ import annotations

import functools
import math
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
        raise FileNotFoundError(f"{p}: no measured error model; run `python -m meshplan.planner.error_model`")
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


# ---- measurement ----------------------------------------------------------------------------------------------
def _rel(approx, exact) -> float:
    return float((approx - exact).double().norm() / exact.double().norm().clamp_min(1e-300))


def _tensors(seed: int = 0, batch: int = 8, seq: int = 64, micro: int = max(FAN_INS)):
    """Real tensors of the tiny model over `micro` micro-batches of [batch, seq] tokens: MoE inputs,
    attention-output gradients, (wo input, wo weight) pairs, and one flat gradient per micro-batch."""
    import torch
    import torch.nn.functional as F

    from ..models import build_model, load_config

    cfg = load_config("tiny")
    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (micro * batch, seq + 1), generator=g)
    moe_in, attn_grad, wo = [], [], []
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith("feed_forward"):
            hooks.append(mod.register_forward_pre_hook(lambda m, a: moe_in.append(a[0].detach().flatten(0, 1))))
        if name.endswith("attention.wo"):
            def grab(m, a, out, _w=mod.weight):
                wo.append((a[0].detach().flatten(0, 1), _w.detach()))
                out.register_hook(lambda gr: attn_grad.append(gr.detach().flatten(0, 1)))
            hooks.append(mod.register_forward_hook(grab))
    grads = []
    for i in range(micro):
        model.zero_grad()
        chunk = data[i * batch:(i + 1) * batch]
        out = model(chunk[:, :-1])
        F.cross_entropy(out.flatten(0, 1), chunk[:, 1:].flatten()).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).clone())
    for h in hooks:
        h.remove()
    return moe_in, attn_grad, wo, grads


def measure(seed: int = 0, fan_ins: tuple[int, ...] = FAN_INS, batch: int = 8, seq: int = 64) -> dict:
    """{kind: {dtype: {n: relative error}}}, measured on the tiny model's tensors: max(fan_ins) micro-batches of
    [batch, seq] tokens (the defaults are what configs/error_model.yaml was measured with; tests pass less)."""
    import torch

    from ..runtime.compression import roundtrip

    moe_in, attn_grad, wo, grads = _tensors(seed, batch, seq, max(fan_ins))
    out: dict = {k: {"bf16": {}, "fp8": {}} for k in KINDS}
    for dt in ("bf16", "fp8"):
        out["move"][dt][1] = _rel(torch.cat([roundtrip(x, dt, "row") for x in moe_in]), torch.cat(moe_in))
        out["move_bwd"][dt][1] = _rel(torch.cat([roundtrip(x, dt, "block") for x in attn_grad]),
                                      torch.cat(attn_grad))
        for n in fan_ins:
            exact, approx = [], []
            for h, w in wo:  # row-parallel: columns of the input (and of the weight) split n ways
                parts = [hc @ wc.T for hc, wc in zip(h.chunk(n, 1), w.chunk(n, 1))]
                exact.append(torch.stack(parts).sum(0))
                approx.append(torch.stack([roundtrip(p, dt, "row").float() for p in parts]).sum(0))
            out["reduce"][dt][n] = _rel(torch.cat(approx), torch.cat(exact))
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    for n in fan_ins:  # gradients: bf16 only (allowed_precisions); one cast each, fp32 sum, one cast of the sum
        parts = torch.stack(grads[:n])
        out["grad"]["bf16"][n] = _rel(bf(bf(parts).sum(0)), parts.sum(0))
        if n >= 4:  # at n = 2 a "node" holds one summand and its partial sum is exact: the flat case
            intra = bf(bf(parts).view(2, n // 2, -1).sum(1))  # [outer, numel]: each node's partial sum, re-cast
            out["grad_2level"]["bf16"][n] = _rel(bf(intra.sum(0)), parts.sum(0))
    del out["grad"]["fp8"], out["grad_2level"]["fp8"]
    return out


def fit(measured: dict) -> dict:
    """Least squares of log err = log c + a·log n per (kind, dtype); a = 0 where only fan-in 1 was measured."""
    res: dict = {}
    for kind, by_dt in measured.items():
        for dt, pts in by_dt.items():
            ns = sorted(pts)
            xs, ys = [math.log(n) for n in ns], [math.log(max(pts[n], 1e-30)) for n in ns]
            if len(ns) == 1:
                a, logc = 0.0, ys[0]
            else:
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                logc = my - a * mx
            worst = max(abs(math.exp(logc) * n ** a / pts[n] - 1) for n in ns)
            res.setdefault(kind, {})[dt] = {"c": float(f"{math.exp(logc):.4g}"), "a": round(a, 4),
                                            "max_fit_rel_dev": round(worst, 4)}
    return res


def write(path: Path = DEFAULT_PATH, seed: int = 0) -> dict:
    measured = measure(seed)
    model = {"meshplan_error_model": 1, "source": f"tiny model, seed {seed} (meshplan.planner.error_model)",
             "form": "relative_error = c * n**a (n: reduction fan-in; moves: c)", "fit": fit(measured),
             "measured": {k: {dt: {int(n): float(f"{v:.4g}") for n, v in pts.items()} for dt, pts in d.items()}
                          for k, d in measured.items()}}
    Path(path).write_text(yaml.safe_dump(model, sort_keys=False))
    load.cache_clear()
    return model


if __name__ == "__main__":
    print(yaml.safe_dump(write(), sort_keys=False))
