"""`meshplan calibrate`: measure this machine and write a cluster YAML the planner can plan for.

Measured: matmul throughput (float32 on CPU; the peak and the size efficiency c of x/(x+c) per GEMM dim are
fitted), memory copy bandwidth, and gloo's time for all_reduce, all_gather, reduce_scatter and all_to_all at
several sizes on 2 and 4 spawned ranks. Each collective's alpha (latency per step) and beta (bandwidth) are
fitted by least squares to the very model the planner prices with (collectives_cost.traffic):
    t = steps(kind, n) · alpha + bytes_sent(kind, n, X) / bandwidth
One machine has one link: inter_node repeats intra_node, and gpus_per_node is the number of ranks it can host.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..inputs import user_config_dir
from ..kernels import dequantize_fp8, quantize_fp8
from ..planner import collectives_cost as cc
from ..planner.cluster import AlphaBeta, Cluster, Link

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
DEFAULT_SIZES = tuple(4 ** k * 1024 for k in range(1, 7))  # 4 KiB .. 4 MiB held per rank


def measure_matmul(sizes=(128, 256, 512, 1024), reps: int = 3) -> list[tuple[int, float]]:
    """(size, FLOP/s) of square float32 matmuls, best of `reps`."""
    out = []
    for s in sizes:
        a, b = torch.randn(s, s), torch.randn(s, s)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(reps))
        out.append((s, 2 * s ** 3 / best))
    return out


def fit_gemm(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """(peak, c) with throughput(x) = peak · (x/(x+c))³ for an x-cubed GEMM, c on a grid, peak by least squares."""
    xs, ys = np.array([s for s, _ in samples], float), np.array([f for _, f in samples], float)
    best = (float(ys.max()), 0.0, float("inf"))
    for c in np.concatenate([[0.0], np.geomspace(1, 8192, 400)]):
        shape = (xs / (xs + c)) ** 3
        peak = float(shape @ ys / (shape @ shape))
        err = float(((peak * shape - ys) ** 2).sum())
        if err < best[2]:
            best = (peak, float(c), err)
    return best[0], best[1]


def measure_copy_bandwidth(nbytes: int = 1 << 26, reps: int = 3) -> float:
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / min(_timed(lambda: dst.copy_(src)) for _ in range(reps))  # read + write


def measure_codec_efficiency(copy_bw: float, rows: int = 4096, dim: int = 1024, reps: int = 3) -> dict[str, float]:
    """Per compressed wire format, the fraction of copy bandwidth its encode + decode reaches on float32
    activations, through the kernels the runtime runs here (kernels: the torch references on CPU): the
    traffic CostModel.codec_time counts over the measured time."""
    x = torch.randn(rows, dim)
    codecs = {"bf16": lambda: x.to(torch.bfloat16).float(),
              "fp8": lambda: dequantize_fp8(*quantize_fp8(x), out_dtype=torch.float32)}
    out = {}
    for dt, fn in codecs.items():
        fn()
        seconds = min(_timed(fn) for _ in range(reps))
        traffic = 2 * (x.numel() * 4 + cc.wire_bytes(x.numel(), rows, dt))
        out[dt] = min(1.0, traffic / seconds / copy_bw)
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def logical_bytes(kind: str, held: int, n: int) -> int:
    """X of collectives_cost.py for a collective where each rank holds `held` bytes before it starts."""
    return held * n if kind in ("all_gather", "all_to_all") else held


def _run(kind: str, x: torch.Tensor, n: int):
    import torch.distributed as dist
    if kind == "all_reduce":
        return lambda: dist.all_reduce(x)
    if kind == "all_gather":
        out = torch.empty(x.numel() * n)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: fn(out, x)
    if kind == "reduce_scatter":
        out = torch.empty(x.numel() // n)
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: fn(out, x)
    out = torch.empty_like(x)
    return lambda: dist.all_to_all_single(out, x)


def _worker(rank: int, world: int, init: str, sizes, reps: int, result: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rows = []
    for kind in KINDS:
        for held in sizes:
            x = torch.ones(max(held // 4 // world, 1) * world)  # float32, divisible by the ranks
            op = _run(kind, x, world)
            op()  # warm-up (connection setup, buffers)
            trials = []
            for _ in range(reps):
                dist.barrier()
                t = torch.tensor([_timed(op)], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a collective ends when its slowest rank does
                trials.append(float(t))
            rows.append((kind, world, x.numel() * 4, statistics.median(trials)))
    if rank == 0:
        Path(result).write_text("\n".join(f"{k} {n} {b} {t!r}" for k, n, b, t in rows))
    dist.destroy_process_group()


def measure_collectives(ranks=(2, 4), sizes=DEFAULT_SIZES, reps: int = 5,
                        start_method: str = "spawn") -> list[tuple[str, int, int, float]]:
    """(kind, ranks, bytes held per rank, seconds), measured on gloo with spawned processes ("fork" starts
    faster where the parent's state is safe to copy)."""
    import torch.multiprocessing as mp
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in ranks:
            init, result = os.path.join(tmp, f"init{world}"), os.path.join(tmp, f"result{world}")
            mp.start_processes(_worker, args=(world, init, tuple(sizes), reps, result), nprocs=world, join=True,
                               start_method=start_method)
            for line in Path(result).read_text().splitlines():
                k, n, b, t = line.split()
                out.append((k, int(n), int(b), float(t)))
    return out


def fit_alpha_beta(samples: list[tuple[str, int, int, float]], kind: str) -> AlphaBeta:
    """Least squares of t = steps·alpha + sent·(1/bandwidth) over every size and rank count of one collective;
    alpha is dropped (set to 0) if the unconstrained fit makes it negative."""
    rows, ts = [], []
    for k, n, held, t in samples:
        if k != kind:
            continue
        tr = cc.traffic(kind, float(logical_bytes(kind, held, n)), n, n)
        rows.append([tr.intra_steps, tr.intra_bytes])
        ts.append(t)
    if not rows:
        raise ValueError(f"no samples for {kind}")
    a, y = np.array(rows, float), np.array(ts, float)
    (alpha, inv_bw), *_ = np.linalg.lstsq(a, y, rcond=None)
    if alpha < 0 or inv_bw <= 0:
        alpha = 0.0
        inv_bw = float(a[:, 1] @ y / (a[:, 1] @ a[:, 1]))
    return AlphaBeta(float(alpha), float(1.0 / max(inv_bw, 1e-18)))


def calibrate(out: str | Path | None = None, ranks=(2, 4), sizes=DEFAULT_SIZES, reps: int = 5,
              name: str = "local", start_method: str = "spawn") -> tuple[Cluster, list]:
    """Measure, fit, and write $XDG_CONFIG_HOME/meshplan/clusters/{name}.yaml (or `out`). Returns the cluster and
    raw samples."""
    gemm = measure_matmul()
    peak, c = fit_gemm(gemm)
    copy_bw = measure_copy_bandwidth()
    codec = measure_codec_efficiency(copy_bw)
    samples = measure_collectives(ranks, sizes, reps, start_method)
    fitted = {k: fit_alpha_beta(samples, k) for k in KINDS}
    ar = fitted["all_reduce"]
    link = Link(bandwidth=ar.bandwidth, latency=ar.latency, collectives=fitted)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cluster = Cluster(name=name, peak_flops=peak, gemm_efficiency=1.0, hbm_bytes=float(ram),
                      hbm_bandwidth=copy_bw, gpus_per_node=max(max(ranks), os.cpu_count() or 1), intra_node=link,
                      inter_node=link, gemm_half_size=c, memory_fraction=0.8, collective_efficiency={},
                      activation_dtype="fp32", codec_efficiency=codec, cpu_cores=torch.get_num_threads(),
                      description=f"measured by meshplan calibrate on {os.uname().nodename} ({os.cpu_count()} CPUs)")
    header = (f"# Measured by `meshplan calibrate` ({time.strftime('%Y-%m-%d %H:%M')}): float32 matmul peak fitted "
              f"as peak·(x/(x+c))^3\n# over sizes {[s for s, _ in gemm]} (so gemm_efficiency is 1: the peak is "
              f"achieved, not nominal); memory copy\n# bandwidth; gloo alpha/beta per collective fitted over "
              f"{len(sizes)} sizes x ranks {list(ranks)}. One machine: inter_node = intra_node.\n"
              f"# Activations are float32 here; codec_efficiency: encode + decode of each wire format (torch path)\n"
              f"# as a fraction of copy bandwidth; cpu_cores: the threads these rates were measured with.\n")
    # never into the install tree: the user's config directory, where load_cluster(name) looks first
    path = Path(out) if out is not None else user_config_dir() / "clusters" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    cluster.to_yaml(path, header)
    return cluster, samples
