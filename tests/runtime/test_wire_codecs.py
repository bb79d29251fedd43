"""The wire formats against codecs written here from their definitions (numpy, no torch casts), and the bf16
gradient reduction's float32 sum against a hand computation.

The numpy codecs (E4M3, bf16 and the fp8 layouts, from docs/reference.md's definitions) are in wire_reference.py.
Equality element by element bounds the runtime's error above and below by the reference's: a codec that
rounds too little (no compression at all) fails as surely as one that rounds too much.
"""
import numpy as np
import pytest
import torch
from wire_reference import bf16, fp8_rows_reference

from meshplan.ir import Mesh
from meshplan.runtime import LocalWorld
from meshplan.runtime.comm_stats import CommStats
from meshplan.runtime.compression import roundtrip
from meshplan.runtime.data_parallel import reduce_flat


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 48, generator=g) * torch.logspace(-3, 2, 48)  # outlier channels, five decades
    x[3] = 0.0  # an all-zero row
    x[5, :4] = torch.tensor([448.0, -1e-6, 2.0 ** -12, 3.0])  # saturation and subnormal codes
    return x


def test_fp8_row_codec_equals_the_e4m3_definition():
    """Mutation tried (benchmarks/mutations.py fp8-scale): the scale amax / 448 -> amax / 240 in
    row_scales_ref (fewer codes used): fails."""
    x = _data()
    got = roundtrip(x, "fp8", "row").numpy()
    want = fp8_rows_reference(x.numpy())
    np.testing.assert_array_equal(got, want)
    rel = np.linalg.norm(got - x.numpy()) / np.linalg.norm(x.numpy())
    assert 1e-3 < rel < 2.0 ** -4  # docs/reference.md (Number formats): at most 2^-4 per normal value


def test_bf16_codec_equals_the_definition():
    """Mutation tried: the bf16 wire cast replaced by float16 in encode: fails (other rounding)."""
    x = _data(1)
    got = roundtrip(x, "bf16").numpy()
    np.testing.assert_array_equal(got, bf16(x.numpy()))
    err = np.abs(got - x.numpy())
    assert err.max() > 0 and np.all(err <= np.abs(x.numpy()) * 2.0 ** -8)  # rounded, by at most half an ulp


def test_bf16_gradient_reduction_sums_in_float32():
    """4 ranks reduce bf16-rounded gradients: the result is bf16(sum of the 4 bf16 values, summed exactly), per
    element. Values are chosen so a bf16 running sum differs: 1 + 3 * 2^-8 is 1.01171875 summed in float32
    (-> bf16 1.015625), but 1 in bf16 steps (each 1 + 2^-8 rounds back to 1, half to even).
    Mutation tried: `recv.float().sum(0)` -> `sum(recv.unbind(0))` (a bf16 running sum) in _reduce_bf16: fails.
    (`recv.sum(0)` on a bf16 tensor is not one: torch accumulates a bf16 reduction in float32 on CPU.)"""
    world = LocalWorld(4, timeout_s=30)
    groups = world.groups(Mesh.of(dp=4))
    g = torch.Generator().manual_seed(0)
    local = [torch.randn(256, generator=g) for _ in range(4)]
    for r in range(4):
        local[r][:8] = 1.0 if r == 0 else 2.0 ** -8

    def rank(r):
        return reduce_flat(local[r].clone(), tuple(groups[r].ordered()), "bf16", CommStats())

    want = bf16(sum(bf16(x.numpy()).astype(np.float64) for x in local))
    for out in world.run(rank):
        np.testing.assert_array_equal(out.numpy(), want)
    assert want[0] == np.float32(1.015625)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp32_gradient_reduction_is_exact_to_float32(precision):
    """The fp32 path sums exactly as a float64 sum rounded to float32 would, up to float32 rounding."""
    world = LocalWorld(2, timeout_s=30)
    groups = world.groups(Mesh.of(dp=2))
    local = [torch.randn(100, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    outs = world.run(lambda r: reduce_flat(local[r].clone(), tuple(groups[r].ordered()), precision, CommStats()))
    exact = (local[0].double() + local[1].double()).numpy()
    want = exact.astype(np.float32) if precision == "fp32" else bf16(bf16(local[0].numpy()) + bf16(local[1].numpy()))
    for out in outs:
        np.testing.assert_array_equal(out.numpy(), want)
