"""Calibration: the fits recover known parameters; a real 2-rank gloo measurement yields a plannable cluster."""
import numpy as np
import pytest

from meshplan.ir import trace
from meshplan.measure.calibrate import calibrate, fit_alpha_beta, fit_gemm, logical_bytes
from meshplan.models import build_model, load_config
from meshplan.planner import Options, load_cluster, search
from meshplan.planner import collectives_cost as cc


def test_fit_alpha_beta_recovers_the_model():
    alpha, bw = 20e-6, 2e9
    samples = []
    for n in (2, 4):
        for held in (4096, 65536, 1 << 20):
            t = cc.traffic("all_to_all", float(logical_bytes("all_to_all", held, n)), n, n)
            samples.append(("all_to_all", n, held, t.intra_steps * alpha + t.intra_bytes / bw))
    ab = fit_alpha_beta(samples, "all_to_all")
    assert ab.latency == pytest.approx(alpha, rel=1e-6) and ab.bandwidth == pytest.approx(bw, rel=1e-6)


def test_fit_gemm_recovers_peak_and_size_efficiency():
    xs = [128, 256, 512, 1024]
    samples = [(x, 5e10 * (x / (x + 96.0)) ** 3) for x in xs]
    peak, c = fit_gemm(samples)
    assert peak == pytest.approx(5e10, rel=0.02) and c == pytest.approx(96, rel=0.05)


def test_calibrate_measures_and_writes_a_cluster(tmp_path):
    out = tmp_path / "local.yaml"
    cluster, samples = calibrate(out, ranks=(2,), sizes=(4096, 65536), reps=1, start_method="fork")
    assert {k for k, *_ in samples} == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"}
    assert all(t > 0 for *_, t in samples)
    loaded = load_cluster(out)
    assert loaded.name == "local" and set(loaded.intra_node.collectives) == {
        "all_reduce", "all_gather", "reduce_scatter", "all_to_all"}
    assert np.isfinite(loaded.peak_flops) and loaded.peak_flops > 0
    # CPU activations are float32; each compressed format's conversion measured as a fraction of copy bandwidth
    assert loaded.activation_dtype == "fp32" and loaded.cpu_cores >= 1
    assert set(loaded.codec_efficiency) == {"bf16", "fp8"}
    assert all(0 < v <= 1 for v in loaded.codec_efficiency.values())
    graph = trace(build_model(load_config("tiny"), device="meta"))
    r = search(graph, loaded, 2, 4, Options(seq=128))  # the planner plans for this machine
    assert r.breakdown.step > 0
