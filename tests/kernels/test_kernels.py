"""Kernels vs torch references vs float64 ground truth.

Triton tests run in Triton's CPU interpreter (or on CUDA, when present and the interpreter is
off). TRITON_INTERPRET must be set before triton is first imported: triton reads it when
a kernel is decorated, which happens when meshplan's `*_triton` modules are first imported.
Outputs the kernels write are pre-filled with NaN / 0xFF so an unwritten element fails.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from meshplan import kernels as K  # noqa: E402
from meshplan.kernels._backend import triton_interpret  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ON_CUDA = torch.cuda.is_available() and not triton_interpret()
DEV = "cuda" if ON_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not K.triton_available() or not (ON_CUDA or triton_interpret()),
    reason="triton not installed (it ships for Linux x86_64 only) or neither CUDA nor "
           "TRITON_INTERPRET=1; only the torch references are tested")
DTYPES = [torch.float32, torch.bfloat16]
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
FP8_NAN = 0xFF  # an e4m3fn NaN code: the encoder never writes it


def rel_err(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def activations(T, H, dtype, seed):
    """Rows spanning 6 decades (per-token scales must follow them), one all-zero row."""
    g = gen(seed)
    x = torch.randn(T, H, generator=g) * 10.0 ** (torch.rand(T, 1, generator=g) * 6 - 3)
    if T:
        x[0] = 0.0
    return x.to(dtype).to(DEV)


# ---------------------------------------------------------------- backend selection


def test_backend_resolution(monkeypatch):
    x = torch.zeros(2, 2)
    assert K.resolve_backend("auto", x, "op") == "torch"
    assert K.resolve_backend("torch", x, "op") == "torch"
    with pytest.raises(ValueError, match="backend='cuda'"):
        K.resolve_backend("cuda", x, "op")
    monkeypatch.setenv("MESHPLAN_KERNELS", "torch")
    assert K.resolve_backend("auto", x, "op") == "torch"
    monkeypatch.setenv("MESHPLAN_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MESHPLAN_KERNELS='cuda'"):
        K.resolve_backend("auto", x, "op")
    monkeypatch.delenv("MESHPLAN_KERNELS")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton'"):
        K.resolve_backend("triton", x, "op")


def test_import_does_not_import_triton():
    code = "import sys, meshplan.kernels; assert 'triton' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- FP8


def e4m3_value(code: np.ndarray) -> np.ndarray:
    e, m = (code >> 3) & 0xF, (code & 7).astype(np.float64)
    mag = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8) * 2.0 ** (e.astype(np.float64) - 7))
    return np.where(code & 0x80, -mag, mag)


def e4m3_ground_truth(v: np.ndarray) -> np.ndarray:
    """Nearest e4m3 code in float64, ties to the even code, saturating at 448."""
    table = e4m3_value(np.arange(127))  # codes 0..126 = 0 .. 448, ascending
    a = np.minimum(np.abs(v), 448.0)
    i = np.clip(np.searchsorted(table, a, side="left"), 1, 126)
    below, above = a - table[i - 1], table[i] - a
    code = np.where((below > above) | ((below == above) & (i % 2 == 0)), i, i - 1)
    return (code | np.where(np.signbit(v), 0x80, 0)).astype(np.uint8)


def codec_sweep() -> torch.Tensor:
    vals = torch.from_numpy(e4m3_value(np.arange(127))).float()
    mids = (vals[1:] + vals[:-1]) / 2  # exact in fp32: every tie
    big, zero = torch.full_like(mids, 1e9), torch.zeros_like(mids)
    g = gen(0)
    log_uniform = 2.0 ** (torch.rand(20000, generator=g) * 26 - 16)
    special = torch.tensor([0.0, 2.0 ** -10, 2.0 ** -11, 1e-30, 1e-42, 448.0, 449.0, 464.0,
                            479.0, 480.0, 1e6, 3e38])
    pos = torch.cat([vals, mids, torch.nextafter(mids, big), torch.nextafter(mids, zero),
                     log_uniform, special])
    return torch.cat([pos, -pos])


def test_torch_fp8_cast_is_nearest_even():
    y = codec_sweep()
    torch_codes = y.clamp(-448, 448).to(K.FP8_DTYPE).view(torch.uint8)
    np.testing.assert_array_equal(torch_codes.numpy(), e4m3_ground_truth(y.double().numpy()))


@needs_triton
def test_e4m3_codec_bit_exact():
    from meshplan.kernels import fp8_triton

    y = codec_sweep()
    codes = fp8_triton.encode_e4m3(y.to(DEV)).cpu()
    np.testing.assert_array_equal(codes.numpy(), e4m3_ground_truth(y.double().numpy()))
    all_codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    decoded = fp8_triton.decode_e4m3(all_codes.to(DEV)).cpu()
    assert torch.equal(decoded.view(torch.int32), all_codes.view(K.FP8_DTYPE).float().view(torch.int32))


def check_fp8_error(x, q, scale):
    """Per element: |deq - x| <= 2^-4 |x| (normals) + 2^-10 * scale (subnormals)."""
    x64 = x.double().cpu()
    s64 = scale.double().cpu()[:, None]
    deq = q.cpu().float().double() * s64
    bound = 2.0 ** -4 * x64.abs() * (1 + 1e-6) + 2.0 ** -10 * s64
    assert ((deq - x64).abs() <= bound).all()
    assert (deq[x64 == 0] == 0).all()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,block_h", [(1, 1, None), (5, 96, None), (37, 72, None),
                                         (64, 33, None), (9, 90, 16), (0, 16, None)])
def test_quantize_fp8(T, H, block_h, dtype):
    from meshplan.kernels import fp8_triton

    x = activations(T, H, dtype, seed=T * 1000 + H)
    q = torch.full((T, H), FP8_NAN, dtype=torch.uint8, device=DEV)
    scale = torch.full((T,), float("nan"), device=DEV)
    fp8_triton.quantize_into(x, q, scale, block_h=block_h)
    q_ref, scale_ref = K.quantize_fp8_ref(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref.view(torch.uint8))  # bit-exact codes
    if T:  # float64 amax / 448 rounded once to float32 is the correctly rounded fp32 quotient
        amax = x.cpu().double().abs().amax(1).clamp_min(2.0 ** -100)
        assert torch.equal(scale.cpu(), (amax / 448).float())
    check_fp8_error(x, q_ref, scale_ref)
    if T * H <= 1000:  # the public entry point too, where the interpreter is quick
        q_pub, s_pub = K.quantize_fp8(x, backend="triton")
        assert q_pub.dtype == K.FP8_DTYPE and torch.equal(q_pub.view(torch.uint8), q)


@needs_triton
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_fp8(out_dtype):
    from meshplan.kernels import fp8_triton

    x = activations(21, 80, torch.float32, seed=7)
    q, scale = K.quantize_fp8_ref(x)
    wire = q.view(torch.uint8)  # what the comm layer ships
    assert torch.equal(wire.view(K.FP8_DTYPE).view(torch.uint8), wire)
    out = torch.full(x.shape, float("nan"), dtype=out_dtype, device=DEV)
    fp8_triton.dequantize_into(wire, scale, out, block_h=32)
    ref = K.dequantize_fp8_ref(q, scale, out_dtype)
    exact = q.cpu().float().double() * scale.cpu().double()[:, None]
    if out_dtype == torch.float32:
        assert torch.equal(out, ref)
    else:  # the interpreter's fp32->bf16 cast truncates; within one bf16 ulp of torch's rounding
        assert ((out.float() - ref.float()).abs() <= 2.0 ** -7 * ref.float().abs()).all()
    assert rel_err(out, exact) < REL_TOL[out_dtype]
    assert torch.equal(K.dequantize_fp8(wire, scale, out_dtype, backend="triton"), out)


def test_fp8_reference_on_cpu():
    x = activations(13, 40, torch.bfloat16, seed=3).cpu()
    q, scale = K.quantize_fp8(x)  # auto on CPU = reference
    check_fp8_error(x, q, scale)
    assert torch.equal(K.dequantize_fp8(q.view(torch.uint8), scale), K.dequantize_fp8_ref(q, scale))


# ---------------------------------------------------------------- permute / unpermute

# (T, H, k, E, experts_per_rank, experts actually routed to: the others stay empty)
ROUTINGS = [(1, 8, 1, 4, 4, None), (37, 72, 2, 8, 2, [0, 1, 5, 6, 7]),
            (64, 96, 4, 16, 4, None), (23, 33, 3, 6, 3, [1, 2, 4, 5]), (0, 16, 2, 4, 2, None)]


def routing(T, k, E, used, seed):
    g = gen(seed)
    pool = torch.tensor(used if used is not None else range(E))
    rows = [pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)]
    return (torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.long)).to(DEV)


def check_dispatch_order(res, topk_idx, E, epr):
    T, k = topk_idx.shape
    idx, rmap = topk_idx.cpu(), res.row_id_map.cpu()
    tpe = res.tokens_per_expert.cpu()
    assert int(tpe.sum()) == T * k
    assert torch.equal(tpe, torch.bincount(idx.reshape(-1), minlength=E))
    assert torch.equal(res.split_sizes.cpu(), tpe.view(E // epr, epr).sum(1))
    assert torch.equal(rmap.reshape(-1).sort().values, torch.arange(T * k))  # a permutation
    row_expert = torch.empty(T * k, dtype=torch.long)
    row_expert[rmap.reshape(-1)] = idx.reshape(-1)
    assert torch.equal(row_expert, torch.repeat_interleave(torch.arange(E), tpe))  # sorted by expert
    src = res.sorted_token_idx.cpu()
    assert torch.equal(src[rmap], torch.arange(T)[:, None].expand(T, k))
    same_expert = row_expert[1:] == row_expert[:-1]
    assert (src[1:][same_expert] >= src[:-1][same_expert]).all()  # stable: token order kept


@needs_triton
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,k,E,epr,used", ROUTINGS)
def test_permute(T, H, k, E, epr, used, dtype, quantize):
    from meshplan.kernels import moe_permute_triton

    x = activations(T, H, dtype, seed=T + H + k)
    topk_idx = routing(T, k, E, used, seed=T * k)
    # the public Triton call is covered by test_unpermute_inverts_permute; the interpreter is
    # slow, so here the kernel runs only into poisoned buffers
    ref = K.permute(x, topk_idx, E, experts_per_rank=epr, quantize=quantize, backend="torch")
    check_dispatch_order(ref, topk_idx, E, epr)
    # one-pass and (for the small cases: the interpreter is slow) chunked rows, into poison
    for block_h in (None, 16) if T * H <= 1000 else (None,):
        if quantize:
            buf = torch.full((T * k, H), FP8_NAN, dtype=torch.uint8, device=DEV)
            scales = torch.full((T * k,), float("nan"), device=DEV)
        else:
            buf, scales = torch.full((T * k, H), float("nan"), dtype=dtype, device=DEV), None
        moe_permute_triton.permute_into(x, ref.row_id_map, buf, scales, block_h=block_h)
        if quantize:
            assert torch.equal(buf, ref.buf.view(torch.uint8)) and torch.equal(scales, ref.scales)
        else:
            assert torch.equal(buf, ref.buf)
    gathered = x.double()[ref.sorted_token_idx]  # float64 ground truth of the row movement
    if quantize:
        check_fp8_error(gathered, buf.view(K.FP8_DTYPE), scales)
    else:
        assert torch.equal(buf.double(), gathered)


def test_permute_errors():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        K.permute(x, torch.tensor([[0], [4], [1]]), 4)
    with pytest.raises(ValueError, match="does not divide"):
        K.permute(x, torch.zeros(3, 1, dtype=torch.long), 4, experts_per_rank=3)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,k,E,epr,used", ROUTINGS)
def test_unpermute(T, H, k, E, epr, used, dtype):
    from meshplan.kernels import moe_unpermute_triton

    g = gen(T + k)
    res = K.dispatch_index(routing(T, k, E, used, seed=H), E, epr)
    y = torch.randn(T * k, H, generator=g).to(dtype).to(DEV)  # expert outputs, dispatch order
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(DEV)
    rmap = res.row_id_map.to(DEV)
    truth = (y.double()[rmap] * w.double()[..., None]).sum(1)
    out = torch.full((T, H), float("nan"), dtype=dtype, device=DEV)
    moe_unpermute_triton.unpermute_into(y, rmap, w, out, block_h=32 if T * H <= 1000 else None)
    ref = K.unpermute_ref(y, rmap, w)
    if T:
        assert rel_err(out, truth) < REL_TOL[dtype] and rel_err(ref, truth) < REL_TOL[dtype]
    # fp8 rows, as uint8 off the wire, with their per-row scales
    q, scale = K.quantize_fp8_ref(y)
    truth8 = (q.float().double()[rmap] * scale.double()[rmap][..., None] * w.double()[..., None]).sum(1)
    out8 = torch.full((T, H), float("nan"), device=DEV)
    moe_unpermute_triton.unpermute_into(q.view(torch.uint8), rmap, w, out8, scales=scale)
    if T:
        assert rel_err(out8, truth8) < 1e-6
        assert rel_err(K.unpermute(q, rmap, w, scales=scale, out_dtype=torch.float32,
                                   backend="torch"), truth8) < 1e-6


@needs_triton
@pytest.mark.parametrize("quantize", [False, True])
def test_unpermute_inverts_permute(quantize):
    T, H, k, E = 29, 40, 3, 8
    x = activations(T, H, torch.float32, seed=11)
    res = K.permute(x, routing(T, k, E, None, seed=5), E, quantize=quantize, backend="triton")
    w = torch.full((T, k), 1.0 / k, device=DEV)
    out = K.unpermute(res.buf, res.row_id_map, w, scales=res.scales, out_dtype=torch.float32,
                      backend="triton")
    if quantize:
        check_fp8_error(x, *K.quantize_fp8_ref(x))
        assert rel_err(out, x) < 2.0 ** -4
    else:
        torch.testing.assert_close(out, x, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- grouped GEMM

# (tokens per local expert, H, F): empty experts, segments not multiples of any block, N = 0
SEGMENTS = [([0, 5, 17, 0, 33], 48, 40), ([64], 96, 72), ([1, 0, 2], 24, 20), ([0, 0], 16, 16)]
SMALL_BLOCKS = dict(block_m=16, block_n=16, block_k=16, group_m=3)  # groups of 3 row tiles: ragged last group


def expert_weights(E, H, F, dtype, seed):
    g = gen(seed)
    w1, w3 = (torch.randn(E, F, H, generator=g) / H ** 0.5 for _ in range(2))
    w2 = torch.randn(E, H, F, generator=g) / F ** 0.5
    return [w.to(dtype).to(DEV) for w in (w1, w3, w2)]


def ffn_truth(x, w1, w3, w2, tpe):
    hs, ys = [], []
    for e, xe in enumerate(torch.split(x.double(), tpe)):
        a, b = xe @ w1[e].double().T, xe @ w3[e].double().T
        hs.append(a * torch.sigmoid(a) * b)
        ys.append(hs[-1] @ w2[e].double().T)
    return torch.cat(hs), torch.cat(ys)


@needs_triton
@pytest.mark.parametrize("config", [{}, SMALL_BLOCKS], ids=["default", "small_blocks"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tpe,H,F", SEGMENTS)
def test_grouped_gemm(tpe, H, F, dtype, config):
    from meshplan.kernels import grouped_gemm_triton

    N, E = sum(tpe), len(tpe)
    x = torch.randn(N, H, generator=gen(N + H)).to(dtype).to(DEV)
    w1, w3, w2 = expert_weights(E, H, F, dtype, seed=F)
    counts = torch.tensor(tpe, device=DEV)
    h_truth, y_truth = ffn_truth(x, w1, w3, w2, tpe)
    h = torch.full((N, F), float("nan"), dtype=dtype, device=DEV)
    grouped_gemm_triton.grouped_gemm_into(x, w1, w3, counts, h, **config)
    y = torch.full((N, H), float("nan"), dtype=dtype, device=DEV)
    grouped_gemm_triton.grouped_gemm_into(h, w2, None, counts, y, **config)
    h_ref = K.grouped_swiglu_ref(x, w1, w3, counts)
    y_ref = K.grouped_gemm_ref(h_ref, w2, counts)
    assert h.shape == h_ref.shape and y.shape == y_ref.shape
    if N:
        tol = REL_TOL[dtype]
        assert rel_err(h, h_truth) < tol and rel_err(h_ref, h_truth) < tol
        assert rel_err(y, y_truth) < tol and rel_err(y_ref, y_truth) < tol
        assert rel_err(K.expert_ffn(x, w1, w3, w2, counts, backend="triton"), y_truth) < tol


@needs_triton
def test_tile_table_covers_each_row_once():
    from meshplan.kernels.grouped_gemm_triton import tile_table

    tpe = torch.tensor([0, 5, 17, 0, 33, 16])
    expert, start, end = tile_table(tpe, int(tpe.sum()), 16)
    owner = torch.repeat_interleave(torch.arange(len(tpe)), tpe)
    seen = torch.zeros(int(tpe.sum()), dtype=torch.long)
    for e, s, t in zip(expert.tolist(), start.tolist(), end.tolist()):
        assert t - s <= 16 and (owner[s:t] == e).all()  # never straddles two experts
        seen[s:t] += 1
    assert (seen == 1).all()


def test_grouped_reference_is_differentiable_and_checked():
    w1, w3, w2 = (w.cpu().requires_grad_() for w in expert_weights(3, 8, 12, torch.float32, 0))
    x = torch.randn(7, 8, requires_grad=True)
    tpe = torch.tensor([3, 0, 4])
    K.expert_ffn(x, w1, w3, w2, tpe).square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, w1, w3, w2))
    with pytest.raises(ValueError, match="sum to the 7 rows"):
        K.grouped_swiglu(x, w1, w3, torch.tensor([3, 0, 3]))


# ---------------------------------------------------------------- compiled (non-interpreted) path

AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshplan.kernels import fp8_triton, grouped_gemm_triton, moe_permute_triton, moe_unpermute_triton
i32, c = "i32", "constexpr"
cases = [
    (fp8_triton._quantize_kernel, ["*bf16", "*u8", "*fp32", i32, i32, i32, c, c], (4096, True)),
    (moe_permute_triton._permute_kernel,
     ["*bf16", "*i64", "*u8", "*fp32", i32, i32, i32, c, c, c, c], (4, True, 1024, False)),
    (moe_unpermute_triton._unpermute_kernel,
     ["*u8", "*fp32", "*i64", "*fp32", "*bf16", i32, i32, i32, c, c, c], (4, True, 1024)),
    (grouped_gemm_triton._grouped_gemm_kernel, ["*bf16"] * 4 + ["*i32"] * 3 + [i32] * 7 + [c] * 7,
     (True, "tf32", False, 128, 64, 64, 8)),
]
for n, (fn, types, consts) in enumerate(cases):
    names = fn.arg_names
    sig = dict(zip(names, types))
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(zip(names[-len(consts):], consts)))
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    if n < 2:  # the fp8 encoders divide exactly (div.rn), for bit-equality with torch
        assert "div.full" not in kernel.asm["ptx"] and "div.rn.f32" in kernel.asm["ptx"], fn
    print("compiled", fn)
"""


@pytest.mark.skipif(not K.triton_available(), reason="triton not installed")
def test_kernels_compile_for_h100(tmp_path):
    """The interpreter does not run Triton's compiler; compile each kernel to an sm_90 cubin
    (no GPU needed) so type and constexpr errors in the compiled path show up here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(AOT_SCRIPT)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("triton's bundled ptxas is missing")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 4
