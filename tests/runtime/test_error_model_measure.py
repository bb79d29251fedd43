"""measure.error_model.measure (what configs/error_model.yaml was measured with) against an independent
computation: the same tiny-model tensors collected here with our own hooks, rounded by the numpy codecs of
wire_reference.py (E4M3 rows and blocks, bf16 from its bit definition), the errors taken in float64.

Reduced budget (fan-ins 2 and 4: 4 micro-batches of [2, 16] tokens) so measure() takes seconds, not ~48 s."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from wire_reference import bf16, fp8_blocks_reference, fp8_rows_reference

from meshplan.measure import error_model
from meshplan.models import build_model, load_config

FAN_INS, BATCH, SEQ, SEED = (2, 4), 2, 16, 3
CODEC = {("bf16", "row"): bf16, ("fp8", "row"): fp8_rows_reference, ("bf16", "block"): bf16,
         ("fp8", "block"): fp8_blocks_reference}


def _rel(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm((approx.astype(np.float64) - exact.astype(np.float64)).ravel())
                 / np.linalg.norm(exact.astype(np.float64).ravel()))


def _collect():
    """MoE-layer inputs, attention-output gradients, (wo input, wo weight) pairs and per-micro-batch flat
    gradients of the tiny model (seed SEED) on max(FAN_INS) micro-batches of seeded tokens, as numpy arrays."""
    cfg = load_config("tiny")
    model = build_model(cfg, seed=SEED)
    micro = max(FAN_INS)
    data = torch.randint(0, cfg.vocab_size, (micro * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(SEED))
    moe_in, attn_grad, wo = [], [], []
    rows = lambda t: t.detach().reshape(-1, t.shape[-1]).numpy()  # noqa: E731

    def at_wo(m, a, out):
        wo.append((rows(a[0]), m.weight.detach().numpy()))
        out.register_hook(lambda g: attn_grad.append(rows(g)))

    for layer in model.layers:
        layer.feed_forward.register_forward_pre_hook(lambda m, a: moe_in.append(rows(a[0])))
        layer.attention.wo.register_forward_hook(at_wo)
    grads = []
    for i in range(micro):
        model.zero_grad()
        chunk = data[i * BATCH:(i + 1) * BATCH]
        F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten()).backward()
        grads.append(np.concatenate([p.grad.numpy().ravel() for p in model.parameters() if p.grad is not None]))
    return moe_in, attn_grad, wo, grads


def expected():
    moe_in, attn_grad, wo, grads = _collect()
    out = {}
    for dt in ("bf16", "fp8"):
        row, block = CODEC[dt, "row"], CODEC[dt, "block"]
        out["move", dt, 1] = _rel(np.concatenate([row(x) for x in moe_in]), np.concatenate(moe_in))
        out["move_bwd", dt, 1] = _rel(np.concatenate([block(g) for g in attn_grad]), np.concatenate(attn_grad))
        for n in FAN_INS:  # row-parallel partial sums: the input's and the weight's columns split n ways
            parts = [[hc @ wc.T for hc, wc in zip(np.array_split(h, n, 1), np.array_split(w, n, 1))] for h, w in wo]
            exact = np.concatenate([np.sum(p, 0, dtype=np.float64) for p in parts])
            approx = np.concatenate([np.sum([row(q) for q in p], 0, dtype=np.float64) for p in parts])
            out["reduce", dt, n] = _rel(approx, exact)
    for n in FAN_INS:
        g = np.stack(grads[:n]).astype(np.float64)
        out["grad", "bf16", n] = _rel(bf16(bf16(g).sum(0)), g.sum(0))  # one cast each, exact sum, one cast
        if n >= 4:  # two levels: 2 nodes of n/2, each node's partial sum cast once more
            intra = bf16(bf16(g).reshape(2, n // 2, -1).sum(1))
            out["grad_2level", "bf16", n] = _rel(bf16(intra.astype(np.float64).sum(0)), g.sum(0))
    return out


@pytest.fixture(scope="module")
def both():
    measured = error_model.measure(SEED, fan_ins=FAN_INS, batch=BATCH, seq=SEQ)
    flat = {(k, dt, n): v for k, d in measured.items() for dt, pts in d.items() for n, v in pts.items()}
    return flat, expected()


def test_measure_equals_the_numpy_codecs_errors(both):
    """Every (kind, dtype, fan-in) measure() reports equals the numpy codecs' error on the same tensors (rtol 1e-4:
    measured agreement is ~2e-7, float32 vs float64 sums moving a few values across a rounding boundary).
    Mutations tried: `roundtrip(x, dt, "block")` -> "row" for move_bwd (per-row scales): fails; the grad kind's
    second cast dropped (`bf(bf(parts).sum(0))` -> `bf(parts).sum(0)`, benchmarks/mutations.py
    error-model-grad-cast): fails."""
    measured, want = both
    assert set(measured) == set(want)
    for key, v in want.items():
        assert measured[key] == pytest.approx(v, rel=1e-4), (key, measured[key], v)


def test_measured_errors_are_the_formats_unit_roundoffs(both):
    """Bounds from the formats alone (docs/reference.md, Number formats): one rounding of a normal value is at most
    2^-9 relative in bf16 and 2^-4 in E4M3; a random-looking tensor's Frobenius error sits within a factor ~4 below
    that (mean of a uniform rounding error). Nothing measured is zero (something was rounded).
    Mutation tried: the move kind measured without the roundtrip (`torch.cat(moe_in)` against itself): fails."""
    measured, _ = both
    for (kind, dt, n), v in measured.items():
        unit = 2.0 ** -9 if dt == "bf16" else 2.0 ** -4
        casts = 2 if kind.startswith("grad") else 1
        assert unit / 8 < v < casts * unit, (kind, dt, n, v)
