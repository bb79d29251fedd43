"""Metrics: one JSON line per step, and a PNG of the curves."""
from __future__ import annotations

import json
from pathlib import Path

TIMING_KEYS = ("time_s", "cpu_s", "step_time_s", "tokens_per_s")  # wall-clock fields: differ between identical runs


class MetricsLog:
    """Appends JSON lines. On resume, drops lines past the checkpoint's step (a run that went on after its last
    checkpoint and then died would otherwise leave steps that the resumed run logs again)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


_PANELS = [("reward", "reward (mean)"), ("eval_accuracy", "held-out accuracy (greedy)"),
           ("response_len", "response length"), ("value_loss", "value loss"), ("clip_frac", "clip fraction"),
           ("entropy", "entropy")]


def plot_metrics(records: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = [r for r in records if r.get("phase") == "rl"]
    vp = [r for r in records if r.get("phase") == "value_pretrain"]  # logged at samples <= 0: before RL
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, label) in zip(axes.flat, _PANELS):
        pts = [(r["samples"], r[key]) for r in rl if r.get(key) is not None]
        if key == "value_loss":
            pts = [(r["samples"], r[key]) for r in vp] + pts
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(pts) < 50 else None)
        ax.set_title(label)
        ax.set_xlabel("RL samples")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
