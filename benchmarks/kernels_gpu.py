"""GPU benchmark of meshplan's MoE communication kernels (meshplan/kernels).

For each kernel at MegaScale-MoE-like sizes (T=8192 tokens, H=4096, E=32 experts, top-k
2..8) it first checks the Triton result against the torch reference, then times both with
triton.testing.do_bench (median). Memory-bound kernels report achieved GB/s next to a
device-to-device copy moving the same number of bytes (the practical ceiling); the grouped
GEMMs report TFLOP/s next to one dense cuBLAS matmul of the same FLOPs.

    python benchmarks/kernels_gpu.py            # writes benchmarks/results/kernels_gpu.json

Exits with a message (status 0) when no CUDA device is present.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # time compiled kernels, never the CPU interpreter

import torch  # noqa: E402

T, H, E, EP, F_FFN = 8192, 4096, 32, 8, 14336  # internal-352b shapes; EP ranks for split sizes
TOPK = (2, 4, 8)
DEVICE = "cuda"
OUT = ROOT / "benchmarks" / "results" / "kernels_gpu.json"


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def copy_ms(nbytes: int) -> float:
    """A D2D copy of nbytes/2 bytes reads and writes nbytes in total."""
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def row(name, params, ms, ms_ref, ok, err, nbytes=None, flops=None, ms_ceiling=None):
    r = dict(kernel=name, **params, ms_triton=ms, ms_torch=ms_ref, speedup_vs_torch=ms_ref / ms,
             correct=ok, rel_err=err)
    if nbytes is not None:
        r.update(bytes=nbytes, gbps=nbytes / ms / 1e6, copy_gbps=nbytes / ms_ceiling / 1e6,
                 frac_of_copy=ms_ceiling / ms)
    if flops is not None:
        r.update(tflops=flops / ms / 1e9, dense_matmul_tflops=flops / ms_ceiling / 1e9,
                 frac_of_dense=ms_ceiling / ms)
    return r


def bench_fp8(K):
    from meshplan.kernels import fp8_triton

    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    q, s = K.quantize_fp8(x, backend="triton")
    q_ref, s_ref = K.quantize_fp8_ref(x)
    ok = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    nbytes = T * H * 2 + T * H + T * 4
    q8 = torch.empty(T, H, dtype=torch.uint8, device=DEVICE)
    yield row("quantize_fp8", dict(T=T, H=H), bench(lambda: fp8_triton.quantize_into(x, q8, s)),
              bench(lambda: K.quantize_fp8_ref(x)), ok, 0.0 if ok else float("nan"),
              nbytes=nbytes, ms_ceiling=copy_ms(nbytes))
    out = torch.empty(T, H, dtype=torch.bfloat16, device=DEVICE)
    deq_ref = K.dequantize_fp8_ref(q_ref, s_ref)
    err = rel_err(K.dequantize_fp8(q, s, backend="triton"), deq_ref)
    yield row("dequantize_fp8", dict(T=T, H=H), bench(lambda: fp8_triton.dequantize_into(q8, s, out)),
              bench(lambda: K.dequantize_fp8_ref(q_ref, s_ref)), err < 1e-2, err,
              nbytes=nbytes, ms_ceiling=copy_ms(nbytes))


def bench_moe(K, k):
    from meshplan.kernels import moe_permute_triton, moe_unpermute_triton

    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    topk_idx = torch.rand(T, E, device=DEVICE).topk(k, dim=1).indices
    weights = torch.softmax(torch.randn(T, k, device=DEVICE), dim=-1)
    index = K.dispatch_index(topk_idx, E, E // EP)
    for quant in (False, True):
        res = K.permute(x, topk_idx, E, experts_per_rank=E // EP, quantize=quant, backend="triton")
        ref = K.permute(x, topk_idx, E, experts_per_rank=E // EP, quantize=quant, backend="torch")
        ok = torch.equal(res.buf.view(torch.uint8), ref.buf.view(torch.uint8))
        elem = 1 if quant else 2
        nbytes = T * H * 2 + T * k * H * elem + (T * k * 4 if quant else 0) + T * k * 8
        buf, scales = res.buf, res.scales
        name = "permute_fp8" if quant else "permute"
        params = dict(T=T, H=H, k=k, E=E)
        yield row(name, params,
                  bench(lambda: moe_permute_triton.permute_into(x, index.row_id_map, buf, scales)),
                  bench(lambda: K.permute_rows_ref(x, index, quant)), ok, 0.0 if ok else float("nan"),
                  nbytes=nbytes, ms_ceiling=copy_ms(nbytes))
        # the whole call, index computation (argsort, histogram, one host sync) included
        yield row(name + "+index", params,
                  bench(lambda: K.permute(x, topk_idx, E, experts_per_rank=E // EP, quantize=quant,
                                          backend="triton")),
                  bench(lambda: K.permute(x, topk_idx, E, experts_per_rank=E // EP, quantize=quant,
                                          backend="torch")), ok, 0.0 if ok else float("nan"))

        y, y_scales = res.buf, res.scales  # stand-in expert outputs, in dispatch order
        out = torch.empty(T, H, dtype=torch.bfloat16, device=DEVICE)
        got = K.unpermute(y, res.row_id_map, weights, scales=y_scales, backend="triton")
        want = K.unpermute_ref(y, res.row_id_map, weights, scales=y_scales)
        err = rel_err(got, want)
        nbytes = T * k * H * elem + (T * k * 4 if quant else 0) + T * H * 2 + T * k * 12
        yield row("unpermute_fp8" if quant else "unpermute", params,
                  bench(lambda: moe_unpermute_triton.unpermute_into(y, res.row_id_map, weights, out,
                                                                   y_scales)),
                  bench(lambda: K.unpermute_ref(y, res.row_id_map, weights, scales=y_scales)),
                  err < 1e-2, err, nbytes=nbytes, ms_ceiling=copy_ms(nbytes))


def bench_gemm(K, k):
    from meshplan.kernels import grouped_gemm_triton

    e_local = E // EP
    N = T * k  # rows a rank receives when routing is balanced
    counts = torch.bincount(torch.randint(0, e_local, (N,), device=DEVICE), minlength=e_local)
    x = torch.randn(N, H, device=DEVICE, dtype=torch.bfloat16)
    w1, w3 = (torch.randn(e_local, F_FFN, H, device=DEVICE, dtype=torch.bfloat16) / H ** 0.5
              for _ in range(2))
    w2 = torch.randn(e_local, H, F_FFN, device=DEVICE, dtype=torch.bfloat16) / F_FFN ** 0.5
    h = K.grouped_swiglu(x, w1, w3, counts, backend="triton")
    h_ref = K.grouped_swiglu_ref(x.float(), w1.float(), w3.float(), counts)
    err1 = rel_err(h, h_ref)
    y = torch.empty(N, H, device=DEVICE, dtype=torch.bfloat16)
    err2 = rel_err(K.grouped_gemm(h, w2, counts, backend="triton"),
                   K.grouped_gemm_ref(h.float(), w2.float(), counts))
    del h_ref
    params = dict(N=N, H=H, F=F_FFN, E_local=e_local, k=k)
    a, b = torch.randn(N, H, device=DEVICE, dtype=torch.bfloat16), w1[0].T.contiguous()
    flops = 2 * N * H * F_FFN * 2
    yield row("grouped_swiglu", params,
              bench(lambda: grouped_gemm_triton.grouped_gemm_into(x, w1, w3, counts, h)),
              bench(lambda: K.grouped_swiglu_ref(x, w1, w3, counts)), err1 < 2e-2, err1,
              flops=flops, ms_ceiling=2 * bench(lambda: a @ b))
    flops = 2 * N * F_FFN * H
    yield row("grouped_gemm", params,
              bench(lambda: grouped_gemm_triton.grouped_gemm_into(h, w2, None, counts, y)),
              bench(lambda: K.grouped_gemm_ref(h, w2, counts)), err2 < 2e-2, err2,
              flops=flops, ms_ceiling=bench(lambda: a @ b))


# Tile configurations tried for the grouped GEMMs (block_m, block_n, block_k, num_warps, num_stages, group_m):
# group_m 10**6 numbers programs row tile fastest (no L2 swizzle), the kernel's order before 2026-11-25.
GEMM_CONFIGS = {
    "swiglu": [(128, 64, 64, 8, 3, 10 ** 6), (128, 64, 64, 8, 3, 8), (128, 64, 64, 8, 4, 8),
               (128, 128, 64, 8, 3, 8), (64, 128, 64, 4, 3, 8)],
    "gemm": [(128, 128, 64, 8, 3, 10 ** 6), (128, 128, 64, 8, 3, 8), (128, 256, 64, 8, 3, 8),
             (128, 128, 64, 8, 4, 8), (128, 256, 64, 8, 4, 8)],
}


def bench_gemm_configs(K, k=2):
    """Each tile configuration of GEMM_CONFIGS on the k=2 problem, checked against the torch path."""
    from meshplan.kernels import grouped_gemm_triton

    e_local, N = E // EP, T * k
    counts = torch.bincount(torch.randint(0, e_local, (N,), device=DEVICE), minlength=e_local)
    x = torch.randn(N, H, device=DEVICE, dtype=torch.bfloat16)
    w1, w3 = (torch.randn(e_local, F_FFN, H, device=DEVICE, dtype=torch.bfloat16) / H ** 0.5 for _ in range(2))
    w2 = torch.randn(e_local, H, F_FFN, device=DEVICE, dtype=torch.bfloat16) / F_FFN ** 0.5
    h_ref = K.grouped_swiglu_ref(x, w1, w3, counts)
    y_ref = K.grouped_gemm_ref(h_ref, w2, counts)
    a, b = torch.randn(N, H, device=DEVICE, dtype=torch.bfloat16), w1[0].T.contiguous()
    dense_ms = bench(lambda: a @ b)
    keys = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "group_m")
    for name, cfgs in GEMM_CONFIGS.items():
        for cfg in cfgs:
            c = dict(zip(keys, cfg))
            if name == "swiglu":
                out = torch.full((N, F_FFN), float("nan"), device=DEVICE, dtype=torch.bfloat16)
                fn = lambda: grouped_gemm_triton.grouped_gemm_into(x, w1, w3, counts, out, **c)  # noqa: E731
                ref, flops, ceil = h_ref, 4 * N * H * F_FFN, 2 * dense_ms
            else:
                out = torch.full((N, H), float("nan"), device=DEVICE, dtype=torch.bfloat16)
                fn = lambda: grouped_gemm_triton.grouped_gemm_into(h_ref, w2, None, counts, out, **c)  # noqa: E731
                ref, flops, ceil = y_ref, 2 * N * F_FFN * H, dense_ms
            try:
                fn()
                err = rel_err(out, ref)
                ms = bench(fn)
            except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is reported
                print(f"config {name} {c}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            r = row(f"grouped_{name}@" + "/".join(map(str, cfg)), dict(N=N, H=H, F=F_FFN, k=k, **c), ms, float("nan"),
                    err < 1e-2, err, flops=flops, ms_ceiling=ceil)
            yield r


def ceilings():
    """The two ceilings METHOD.md asks for: a 4 GB device-to-device copy, an 8192^3 bf16 matmul."""
    n = 8192
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    ms = bench(lambda: a @ b)
    copy = copy_ms(4 << 30)
    return dict(matmul_tflops=2 * n ** 3 / ms / 1e9, copy_gbps=(4 << 30) / copy / 1e6)


def main() -> int:
    if not torch.cuda.is_available():
        print("kernels_gpu: no CUDA device; nothing to benchmark (run this on a GPU machine).")
        return 0
    import triton

    from meshplan import kernels as K

    results, t0 = [], time.time()
    ceil = ceilings()
    print(f"ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s", flush=True)
    runs = [lambda: bench_fp8(K)] + [lambda k=k: bench_moe(K, k) for k in TOPK] \
        + [lambda k=k: bench_gemm(K, k) for k in (2, 8)] + [lambda: bench_gemm_configs(K)]
    for run in runs:
        for r in run():
            results.append(r)
            extra = (f"{r['gbps']:8.0f} GB/s ({r['frac_of_copy']:5.1%} of copy)" if "gbps" in r else
                     f"{r['tflops']:8.1f} TFLOP/s ({r['frac_of_dense']:5.1%} of dense)" if "tflops" in r
                     else "")
            print(f"{r['kernel']:28s} k={r.get('k', '-')!s:2s} triton {r['ms_triton']:8.3f} ms  "
                  f"torch {r['ms_torch']:8.3f} ms  x{r['speedup_vs_torch']:5.2f}  {extra}  "
                  f"{'ok' if r['correct'] else 'MISMATCH'} (rel_err {r['rel_err']:.1e})", flush=True)
        torch.cuda.empty_cache()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, ceilings=ceil,
                                   triton=triton.__version__, seconds=time.time() - t0,
                                   results=results), indent=2))
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0 if all(r["correct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
