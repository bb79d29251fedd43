"""Helpers shared by the benchmarks: timing (median over repeats), rank statistics, JSON results, tables.

Everything here is pure Python/numpy, imported by the benchmark scripts (run as files, `python benchmarks/x.py`)
and by tests/benchmarks/test_bench_smoke.py.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meshplan.table import format_table  # noqa: E402


def machine() -> dict:
    """Where and under what load a measurement ran (2-core VMs are shared: always record the load)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"host": platform.node(), "cpus": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in load],
            "python": platform.python_version(), "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def median(xs) -> float:
    xs = [float(x) for x in xs]
    return statistics.median(xs) if xs else float("nan")


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
    """Wall time of fn(): `warmup` untimed calls, then `repeats` timed ones; median, min and all samples (s)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return {"median_s": median(samples), "min_s": min(samples), "samples_s": samples}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, dict]:
    """Time several callables side by side: each round calls every one once, in a rotated order, so drift in
    machine load hits all of them alike. Returns {name: time_call-style dict}."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t)
    return {n: {"median_s": median(s), "min_s": min(s), "samples_s": s} for n, s in samples.items()}


def timed_step(pm, tokens, targets, time_forward: bool = True) -> tuple[float | None, float, float]:
    """One training step of a ParallelModel on every rank, timed between barriers: (forward seconds, whole step
    seconds, loss). Gradients are cleared first and reduced at the end, as a training loop does. time_forward=False
    leaves out the barrier after the forward (forward seconds None), so nothing but the step is synchronised."""
    import torch.distributed as dist
    import torch.nn.functional as F

    for p in pm.parameters():
        p.grad = None
    dist.barrier()
    t0 = time.perf_counter()
    loss = F.cross_entropy(pm(tokens).flatten(0, 1), targets.flatten())
    forward = None
    if time_forward:
        dist.barrier()
        forward = time.perf_counter() - t0
    loss.backward()
    pm.reduce_gradients()
    dist.barrier()
    return forward, time.perf_counter() - t0, loss.item()


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span (as scipy.stats.rankdata's default)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(1, len(x) + 1, dtype=float)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks. nan if either is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"spearman: lengths differ ({len(a)} vs {len(b)})")
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def relative_errors(predicted, measured) -> list[float]:
    """|predicted - measured| / measured, per pair."""
    return [abs(p - m) / m for p, m in zip(predicted, measured)]


def write_json(name: str, data: dict, results_dir: Path | str | None = None) -> Path:
    """benchmarks/results/<name>.json (or results_dir/<name>.json); adds the machine record; returns the path."""
    d = Path(results_dir) if results_dir is not None else RESULTS
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=1, default=_default, allow_nan=True) + "\n")
    return path


def _default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def print_table(headers: list[str], rows: list[list], align: str | None = None, title: str | None = None) -> str:
    text = format_table(headers, rows, align=align)
    if title:
        text = f"{title}\n{text}"
    print(text, flush=True)
    return text


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
