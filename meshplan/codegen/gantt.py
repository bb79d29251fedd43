"""A Gantt chart of schedules: one panel per schedule, its streams as rows, tasks as bars coloured by phase.

Panels share the time axis, so the overlap schedule and the sequential one compare at a glance: where a comm bar
sits above a compute bar, communication is hidden. Backward bars are lighter; chunk numbers label bars wide enough.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on build machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .phases import COMM, COMPUTE  # noqa: E402
from .schedule import Schedule  # noqa: E402
from .task_graph import BWD, Task  # noqa: E402

_LANES = (COMPUTE, COMM)  # top to bottom
# Fixed colours so that a phase looks the same in every chart: saturated for collectives (what overlap must hide),
# the gradient reduction dark enough to stay distinct when drawn lighter as backward work.
PALETTE = {
    "dispatch": "#ff7f0e", "combine": "#1f77b4", "qkv_a2a": "#e377c2", "out_a2a": "#9467bd",
    "all-gather": "#17becf", "reduce-scatter": "#bcbd22", "all-to-all": "#8c564b", "all-reduce": "#7f7f7f",
    "grad all-reduce": "#b00020",
    "route": "#98df8a", "experts": "#2ca02c", "shared": "#6b8e23", "unpermute": "#c7c7c7",
    "qkv": "#c49c94", "core": "#aec7e8", "out_proj": "#8c6d31", "attention": "#aec7e8", "moe": "#2ca02c",
    "ffn": "#3cb371", "linear": "#dbdb8d", "lm_head": "#f7b6d2", "embedding": "#ffbb78", "norm": "#c5b0d5",
    "generic": "#d9d9d9",
}


def color_key(task: Task) -> str:
    """What a bar's colour says: the phase of a split op, the collective of a resharding, the op kind otherwise."""
    if task.phase.startswith("grad"):
        return "grad all-reduce"
    if task.phase.startswith("in"):
        return task.collective.replace("_", "-")
    return task.kind if task.phase == "compute" else task.phase


def plot_gantt(schedules: dict[str, Schedule], path: str | Path, title: str = "") -> Path:
    """Write a PNG with one panel per (label -> schedule), in the given order."""
    keys = sorted({color_key(s.task) for sch in schedules.values() for s in sch.slots})
    cmap = plt.get_cmap("tab20")
    colors = {k: PALETTE.get(k) or cmap(i % 20) for i, k in enumerate(keys)}
    end = max((sch.makespan for sch in schedules.values()), default=0.0)
    scale, unit = (1e3, "ms") if end >= 1e-3 else (1e6, "us")
    fig, axes = plt.subplots(len(schedules), 1, sharex=True, squeeze=False,
                             figsize=(16, 1.6 + 1.5 * len(schedules)))
    for ax, (label, sch) in zip(axes[:, 0], schedules.items()):
        # One broken_barh call per (lane, colour, direction): thousands of tasks draw in a second, not a minute.
        groups: dict[tuple, list] = {}
        for s in sch.slots:
            y = len(_LANES) - 1 - _LANES.index(s.task.stream)
            groups.setdefault((y, color_key(s.task), s.task.direction == BWD), []).append(
                (s.start * scale, (s.end - s.start) * scale))
            if s.task.chunk is not None and (s.end - s.start) > end / 150:
                ax.text((s.start + s.end) / 2 * scale, y, str(s.task.chunk), ha="center", va="center", fontsize=6)
        for (y, key, bwd), bars in groups.items():
            # Backward in a lighter shade (hatching reads better but costs seconds per thousand bars in Agg).
            ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=colors[key], alpha=0.5 if bwd else 1.0,
                           edgecolor="white", linewidth=0.4)
        ax.set_yticks(range(len(_LANES)), list(reversed(_LANES)))
        ax.set_ylim(-0.6, len(_LANES) - 0.4)
        ax.axvline(sch.makespan * scale, color="black", linewidth=1)
        ax.set_title(f"{label}: makespan {sch.makespan * scale:.4g} {unit}, exposed comm "
                     f"{sch.exposed_comm * scale:.4g} {unit}", fontsize=9, loc="left")
        ax.grid(axis="x", linewidth=0.3)
    axes[-1, 0].set_xlabel(f"time ({unit})")
    handles = [Patch(color=colors[k], label=k) for k in keys]
    handles.append(Patch(facecolor="grey", alpha=0.5, label="backward (lighter)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * (len(handles) > 10), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
