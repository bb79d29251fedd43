"""Measure the relative error each compressed collective adds and fit the closed form the planner reads.

What is measured and why the fit is a power law: meshplan/planner/error_model.py's docstring (the planner's half,
which reads configs/error_model.yaml). This half runs the tiny model and the runtime's codecs
(runtime/compression.py), so it lives above the runtime; `python -m meshplan.measure.error_model` re-measures and
rewrites configs/error_model.yaml.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from ..models import build_model, load_config
from ..planner.error_model import DEFAULT_PATH, FAN_INS, KINDS, load
from ..runtime.compression import roundtrip


def _rel(approx, exact) -> float:
    return float((approx - exact).double().norm() / exact.double().norm().clamp_min(1e-300))


def _tensors(seed: int = 0, batch: int = 8, seq: int = 64, micro: int = max(FAN_INS)):
    """Real tensors of the tiny model over `micro` micro-batches of [batch, seq] tokens: MoE inputs,
    attention-output gradients, (wo input, wo weight) pairs, and one flat gradient per micro-batch."""
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
    model = {"meshplan_error_model": 1, "source": f"tiny model, seed {seed} (meshplan.measure.error_model)",
             "form": "relative_error = c * n**a (n: reduction fan-in; moves: c)", "fit": fit(measured),
             "measured": {k: {dt: {int(n): float(f"{v:.4g}") for n, v in pts.items()} for dt, pts in d.items()}
                          for k, d in measured.items()}}
    Path(path).write_text(yaml.safe_dump(model, sort_keys=False))
    load.cache_clear()
    return model


if __name__ == "__main__":
    print(yaml.safe_dump(write(), sort_keys=False))
