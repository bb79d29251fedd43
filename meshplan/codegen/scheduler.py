"""List scheduling of a step's task graph onto two streams, compute and comm, and the no-overlap baseline.

Two priority rules, both list scheduling, and `list_schedule` keeps whichever gives the shorter step (neither
wins everywhere: on the tiny model each is ahead on some plans):
- `earliest_start_schedule`: among the tasks whose dependencies are placed, the one that can start earliest on its
  stream goes next (a collective is issued as soon as its inputs exist and the comm stream is free), ties broken
  by the longest chain from the task to the end of the step (critical path first);
- `insertion_schedule`: critical path first, each task in the earliest gap of its stream (HEFT), so gradient
  reductions fill gaps rather than hold the comm stream when a critical all-to-all becomes ready.
Both never leave both streams idle while a task is ready, so a step is never longer than its tasks run one at a
time (`sequential_schedule`).
"""
from __future__ import annotations

import bisect
import heapq
import math

from .durations import Durations
from .phases import COMM, COMPUTE
from .schedule import Schedule, ScheduleError, Slot
from .task_graph import TaskGraph, build_task_graph


def task_durations(tg: TaskGraph, durations: Durations) -> dict[str, float]:
    out = {}
    for t in tg:
        d = float(durations(t))
        if not math.isfinite(d) or d < 0:
            raise ScheduleError(f"task {t.id!r}: duration {d!r} from {getattr(durations, 'name', durations)} "
                                f"is not a finite non-negative number of seconds")
        out[t.id] = d
    return out


def bottom_levels(tg: TaskGraph, dur: dict[str, float]) -> dict[str, float]:
    """For each task, the longest chain of durations from its start to the end of the step."""
    succ = tg.successors()
    bl: dict[str, float] = {}
    for tid in reversed(list(tg.tasks)):
        bl[tid] = dur[tid] + max((bl[s] for s in succ[tid]), default=0.0)
    return bl


def critical_path(tg: TaskGraph, durations: Durations) -> float:
    """The makespan with unlimited streams: a lower bound for any schedule of this task graph."""
    return max(bottom_levels(tg, task_durations(tg, durations)).values(), default=0.0)


def list_schedule(tg: TaskGraph, durations: Durations) -> Schedule:
    """The shorter of the two list schedules (the earliest-start one on a tie)."""
    a, b = earliest_start_schedule(tg, durations), insertion_schedule(tg, durations)
    return b if b.makespan < a.makespan else a


def earliest_start_schedule(tg: TaskGraph, durations: Durations) -> Schedule:
    dur = task_durations(tg, durations)
    bl = bottom_levels(tg, dur)
    succ = tg.successors()
    order = {tid: i for i, tid in enumerate(tg.tasks)}
    waiting = {t.id: len(set(t.deps)) for t in tg}
    ready_at = {t.id: 0.0 for t in tg}
    free = {COMPUTE: 0.0, COMM: 0.0}
    # Per stream: tasks whose inputs arrive after the stream frees up, by arrival; and tasks already waiting for the
    # stream, by priority. (One heap keyed on the earliest start would requeue every waiting task each time its
    # stream advances: quadratic on comm-bound steps.)
    arriving: dict[str, list] = {COMPUTE: [], COMM: []}
    queued: dict[str, list] = {COMPUTE: [], COMM: []}
    for t in tg:
        if not t.deps:
            heapq.heappush(arriving[t.stream], (0.0, -bl[t.id], order[t.id], t.id))
    slots = []

    def candidate(stream):  # (earliest start, priority key) of the stream's next task, or None
        while arriving[stream] and arriving[stream][0][0] <= free[stream]:
            _, negbl, i, tid = heapq.heappop(arriving[stream])
            heapq.heappush(queued[stream], (negbl, i, tid))
        if queued[stream]:
            return (free[stream],) + queued[stream][0], queued[stream]
        return (arriving[stream][0], arriving[stream]) if arriving[stream] else None

    while True:
        picks = [c for c in (candidate(COMPUTE), candidate(COMM)) if c is not None]
        if not picks:
            break
        key, heap = min(picks, key=lambda c: c[0])
        heapq.heappop(heap)
        start, tid = key[0], key[-1]
        task = tg[tid]
        end = start + dur[tid]
        free[task.stream] = end
        slots.append(Slot(task, start, end))
        for s in dict.fromkeys(succ[tid]):
            ready_at[s] = max(ready_at[s], end)
            waiting[s] -= 1
            if waiting[s] == 0:
                heapq.heappush(arriving[tg[s].stream], (ready_at[s], -bl[s], order[s], s))
    if len(slots) != len(tg):
        stuck = next(t for t in tg.tasks if waiting[t] > 0)
        raise ScheduleError(f"task {stuck!r} never became ready: the task graph has a cycle or a missing task")
    return Schedule(slots, {**tg.meta, "policy": "earliest_start", "durations": _name(durations)})


def insertion_schedule(tg: TaskGraph, durations: Durations) -> Schedule:
    """Tasks in critical-path order (longest remaining chain first), each placed in the earliest gap on its stream
    after its dependencies (HEFT's insertion policy). Short off-critical-path collectives such as gradient
    reductions then fill idle gaps instead of holding the comm stream when a critical all-to-all needs it."""
    dur = task_durations(tg, durations)
    bl = bottom_levels(tg, dur)
    order = {tid: i for i, tid in enumerate(tg.tasks)}
    # Each stream's idle gaps, sorted and disjoint (ends sorted too), the last open-ended. Tracking gaps rather than
    # busy intervals keeps the search short: a packed stream has few gaps however many tasks it holds.
    gaps = {st: ([0.0], [math.inf]) for st in (COMPUTE, COMM)}
    placed: dict[str, Slot] = {}
    # Decreasing bottom level is a topological order (a task's level exceeds its successors'); the graph's own
    # order breaks ties, which zero-length tasks can create.
    for tid in sorted(tg.tasks, key=lambda t: (-bl[t], order[t])):
        task, d = tg[tid], dur[tid]
        ready = max((placed[x].end for x in task.deps), default=0.0)
        starts, ends = gaps[task.stream]
        i = bisect.bisect_right(ends, ready)  # the first gap still open after `ready`
        while ends[i] - max(starts[i], ready) < d:
            i += 1
        start = max(starts[i], ready)
        pieces = [(b, e) for b, e in ((starts[i], start), (start + d, ends[i])) if e > b]
        starts[i:i + 1], ends[i:i + 1] = [b for b, _ in pieces], [e for _, e in pieces]
        placed[tid] = Slot(task, start, start + d)
    slots = sorted(placed.values(), key=lambda s: (s.start, s.end, order[s.id]))
    return Schedule(slots, {**tg.meta, "policy": "insertion", "durations": _name(durations)})


def sequential_schedule(tg: TaskGraph, durations: Durations) -> Schedule:
    """Every task after the previous one, in the graph's order: no overlap of communication with computation."""
    dur = task_durations(tg, durations)
    t, slots = 0.0, []
    for task in tg:
        slots.append(Slot(task, t, t + dur[task.id]))
        t += dur[task.id]
    return Schedule(slots, {**tg.meta, "policy": "sequential", "durations": _name(durations)})


def compare(graph, plan, batch: int, seq: int, durations: Durations, chunks: int = 2,
            chunk_kinds: set[str] | None = None) -> dict[str, Schedule]:
    """The schedules a user compares for one plan: sequential (c=1, no overlap), overlap without chunks, and
    overlap with `chunks` chunks (keys "sequential", "overlap_c1", "overlap")."""
    whole = build_task_graph(graph, plan, batch, seq, 1)
    split = build_task_graph(graph, plan, batch, seq, chunks, chunk_kinds) if chunks > 1 else whole
    return {"sequential": sequential_schedule(whole, durations), "overlap_c1": list_schedule(whole, durations),
            "overlap": list_schedule(split, durations)}


def _name(durations) -> str:
    return str(getattr(durations, "name", type(durations).__name__))
