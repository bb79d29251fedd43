"""Statistics, table and plot of an RL comparison (rl_compare.py, rl_ablation.py): mean gain per algorithm with a
95% bootstrap CI over seeds, and paired per-seed differences against a reference algorithm.

A run is a dict with "algo", "seed", "start", "final", "best", "samples", "pretrain_samples" and "curve" (a list of
[samples, held-out accuracy, held-out response length]); "train_curve" holds [samples, mean sampled response length].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def bootstrap_ci(x, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the percentile bootstrap interval of the mean of x (resampling x with replacement)."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"bootstrap_ci: need a non-empty 1-D sample, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(lo), float(hi)


def by_algo(runs: list[dict], algos: list[str]) -> dict[str, dict[int, dict]]:
    """{algo: {seed: run}}, in the order of `algos`; an algorithm with no run is left out."""
    out = {a: {r["seed"]: r for r in runs if r["algo"] == a} for a in algos}
    return {a: rs for a, rs in out.items() if rs}


def check_same_start(runs: list[dict]) -> None:
    """Every algorithm of a seed must start from the same policy: same warm-up weights, same held-out accuracy."""
    for seed in sorted({r["seed"] for r in runs}):
        rs = [r for r in runs if r["seed"] == seed]
        if len({r["start"] for r in rs}) > 1 or len({r.get("warmup", "") for r in rs}) > 1:
            raise AssertionError(f"seed {seed}: runs start from different policies: "
                                 + ", ".join(f"{r['algo']} {r['start']:.4f} ({r.get('warmup')})" for r in rs))


def _ci(x) -> str:
    m, lo, hi = bootstrap_ci(x)
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def summary_table(runs: list[dict], algos: list[str]) -> str:
    lines = ["| algorithm | seeds | start | final | gain final - start, mean [95% CI] | best - start | RL samples "
             "| pretrain samples | response length start -> final | wall s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for algo, rs in by_algo(runs, algos).items():
        r = list(rs.values())
        start, final = np.array([x["start"] for x in r]), np.array([x["final"] for x in r])
        best = np.array([x["best"] for x in r])
        l0, l1 = np.mean([x["curve"][0][2] for x in r]), np.mean([x["curve"][-1][2] for x in r])
        lines.append(f"| {algo} | {len(r)} | {start.mean():.3f} | {final.mean():.3f} | {_ci(final - start)} | "
                     f"{(best - start).mean():+.3f} | {int(np.mean([x['samples'] for x in r]))} | "
                     f"{int(np.mean([x['pretrain_samples'] for x in r]))} | {l0:.0f} -> {l1:.0f} | "
                     f"{np.mean([x.get('wall_s', 0.0) for x in r]):.0f} |")
    return "\n".join(lines)


def paired_table(runs: list[dict], algos: list[str], ref: str) -> str:
    """ref - X per seed (final held-out accuracy; the seeds' starts are equal, so this is the gain difference)."""
    groups = by_algo(runs, algos)
    if ref not in groups:
        return f"(no {ref} runs: no paired comparison)"
    lines = [f"| {ref} - X | seeds | final-accuracy difference, mean [95% CI] | {ref} better on |", "|---|---|---|---|"]
    for algo, rs in groups.items():
        if algo == ref:
            continue
        seeds = sorted(set(rs) & set(groups[ref]))
        if not seeds:
            continue
        d = np.array([groups[ref][s]["final"] - rs[s]["final"] for s in seeds])
        lines.append(f"| {ref} - {algo} | {len(seeds)} | {_ci(d)} | {int((d > 0).sum())} of {len(seeds)} seeds |")
    return "\n".join(lines)


def _band(ax, xs, ys, label):
    m = ys.mean(0)
    if len(ys) > 1:
        ci = np.array([bootstrap_ci(col, n_boot=2000)[1:] for col in ys.T])
        line, = ax.plot(xs, m, label=f"{label} ({len(ys)} seeds)")
        ax.fill_between(xs, ci[:, 0], ci[:, 1], color=line.get_color(), alpha=0.15)
    else:
        ax.plot(xs, m, label=f"{label} (1 seed)")


def plot(runs: list[dict], algos: list[str], path: Path, title: str) -> None:
    """Held-out gain, held-out response length and sampled response length against RL samples: mean over seeds
    with a 95% bootstrap band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for algo, rs in by_algo(runs, algos).items():
        curves = [r["curve"] for r in rs.values()]
        n = min(len(c) for c in curves)  # a shared eval schedule; DAPO's resampling may end a run a step later
        xs = np.array([[c[i][0] for i in range(n)] for c in curves]).mean(0)
        _band(axes[0], xs, np.array([[c[i][1] - c[0][1] for i in range(n)] for c in curves]), algo)
        _band(axes[1], xs, np.array([[c[i][2] for i in range(n)] for c in curves]), algo)
        train = [r["train_curve"] for r in rs.values()]
        m = min(len(c) for c in train)
        _band(axes[2], np.array([[c[i][0] for i in range(m)] for c in train]).mean(0),
              np.array([[c[i][1] for i in range(m)] for c in train]), algo)
    for ax, label in zip(axes, ("held-out accuracy - start (greedy)", "held-out response length (greedy)",
                                "sampled response length (training)")):
        ax.set_xlabel("RL samples generated")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
