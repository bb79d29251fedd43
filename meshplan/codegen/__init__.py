"""Codegen: from a Plan to what runs. The overlap schedule lives here (task_graph -> durations -> scheduler ->
schedule, inspected with `meshplan schedule`) and the emitted overlap code; Triton kernels live in meshplan/kernels/.

Typical use:
    tg = build_task_graph(graph, plan, batch, seq, chunks=2)
    sch = list_schedule(tg, durations_for("h800")).validate(set(tg.tasks))

The names below load on first use: importing `meshplan.kernels` must stay free of the IR (whose torch.fx
imports pull in triton), so this package imports nothing eagerly.
"""
import importlib

_EXPORTS = {
    "durations": ["ROOFLINES", "Durations", "Fixed", "PlannerDurations", "Roofline", "durations_for", "wire_bytes"],
    "schedule": ["Schedule", "ScheduleError", "Slot"],
    "scheduler": ["compare", "critical_path", "earliest_start_schedule", "insertion_schedule", "list_schedule",
                  "sequential_schedule"],
    "task_graph": ["Task", "TaskGraph", "TaskGraphError", "build_task_graph"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
