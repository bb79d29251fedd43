"""A Schedule: every task of a step placed on a stream with a predicted start and end. Data, not behaviour.

A code emitter walks `program()`: per stream, the tasks in the order they run there (so a dependency on the same
stream needs nothing) and, for each, its dependencies on the other stream, where the emitted code records an event
after the producer and waits on it before the task (for a collective: before issuing it). A task says what to run:
op and phase (a resharding edge is phase "in<i>", the consumer's input i), collective, mesh axes, and which batch
chunk (`chunk` of `meta["chunks"]`, None for the whole batch). `validate()` is what makes a schedule safe to
emit: every dependency respected, every task once, no two tasks at once on one stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .phases import COMM, COMPUTE, STREAMS
from .task_graph import Task

FORMAT_VERSION = 1
# A big model's schedule has ~10^4 tasks: use libyaml's C emitter and parser when PyYAML was built with it.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ScheduleError(ValueError):
    """A schedule breaks a rule; the message names the task."""


@dataclass(frozen=True)
class Slot:
    task: Task
    start: float  # seconds from the step's start
    end: float

    @property
    def id(self) -> str:
        return self.task.id

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Schedule:
    slots: list[Slot]  # ordered by start time
    meta: dict = field(default_factory=dict)  # model, mesh, batch, seq, chunks, policy, durations

    # ---- views ----------------------------------------------------------------------------------------------
    @property
    def makespan(self) -> float:
        return max((s.end for s in self.slots), default=0.0)

    def __getitem__(self, task_id: str) -> Slot:
        return self._by_id()[task_id]

    def _by_id(self) -> dict[str, Slot]:
        return {s.id: s for s in self.slots}

    def in_stream_order(self, stream: str) -> list[Slot]:
        return sorted((s for s in self.slots if s.task.stream == stream), key=lambda s: (s.start, s.end))

    def busy(self, stream: str) -> float:
        return sum(s.duration for s in self.slots if s.task.stream == stream)

    def waits(self, slot: Slot, by_id: dict[str, Slot] | None = None) -> list[str]:
        """Dependencies on another stream: where emitted code must wait on an event."""
        by_id = by_id if by_id is not None else self._by_id()
        return [d for d in slot.task.deps if by_id[d].task.stream != slot.task.stream]

    def program(self) -> dict[str, list[tuple[Slot, list[str]]]]:
        """What an emitter walks: per stream, its tasks in order, each with the other-stream tasks it waits for."""
        by_id = self._by_id()
        return {st: [(s, self.waits(s, by_id)) for s in self.in_stream_order(st)] for st in STREAMS}

    @property
    def exposed_comm(self) -> float:
        """Time communication runs while the compute stream is idle: what overlap failed to hide."""
        comm = _merge([(s.start, s.end) for s in self.slots if s.task.stream == COMM])
        compute = _merge([(s.start, s.end) for s in self.slots if s.task.stream == COMPUTE])
        return sum(e - b for b, e in comm) - _intersection(comm, compute)

    def summary(self) -> str:
        return (f"makespan {self.makespan * 1e6:.1f} us, exposed comm {self.exposed_comm * 1e6:.1f} us "
                f"(comm {self.busy(COMM) * 1e6:.1f} us, compute {self.busy(COMPUTE) * 1e6:.1f} us)")

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self, expected: set[str] | None = None) -> "Schedule":
        """Raise ScheduleError naming the first offending task; `expected`: the task ids that must all appear."""
        by_id: dict[str, Slot] = {}
        for s in self.slots:
            if s.id in by_id:
                raise ScheduleError(f"task {s.id!r} is scheduled twice (at {_us(by_id[s.id].start)} and "
                                    f"{_us(s.start)})")
            by_id[s.id] = s
            if s.task.stream not in STREAMS:
                raise ScheduleError(f"task {s.id!r}: unknown stream {s.task.stream!r} (streams: {STREAMS})")
            if not s.start >= 0 or not s.end >= s.start:
                raise ScheduleError(f"task {s.id!r}: bad interval [{_us(s.start)}, {_us(s.end)}]")
        if expected is not None:
            for t in expected:
                if t not in by_id:
                    raise ScheduleError(f"task {t!r} is missing from the schedule")
            for t in by_id:
                if t not in expected:
                    raise ScheduleError(f"task {t!r} is not a task of this step")
        eps = 1e-9 * max(self.makespan, 1e-12)  # float round-off in sums of durations
        for s in self.slots:
            for d in s.task.deps:
                if d not in by_id:
                    raise ScheduleError(f"task {s.id!r} depends on {d!r}, which is missing from the schedule")
                if s.start < by_id[d].end - eps:
                    raise ScheduleError(f"task {s.id!r} starts at {_us(s.start)}, before its dependency {d!r} "
                                        f"ends at {_us(by_id[d].end)}")
        for stream in STREAMS:
            order = self.in_stream_order(stream)
            for a, b in zip(order, order[1:]):
                if b.start < a.end - eps:
                    raise ScheduleError(f"tasks {a.id!r} and {b.id!r} overlap on stream {stream} "
                                        f"([{_us(a.start)}, {_us(a.end)}] and [{_us(b.start)}, {_us(b.end)}])")
        return self

    # ---- serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"meshplan_schedule": FORMAT_VERSION, "meta": self.meta, "makespan": self.makespan,
                "exposed_comm": self.exposed_comm,
                "tasks": [{**s.task.to_dict(), "start": s.start, "end": s.end} for s in self.slots]}

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        if not isinstance(d, dict) or "tasks" not in d:
            raise ScheduleError("schedule: expected a mapping with a 'tasks' list")
        if d.get("meshplan_schedule", FORMAT_VERSION) != FORMAT_VERSION:
            raise ScheduleError(f"schedule.meshplan_schedule: format {d['meshplan_schedule']!r} unsupported")
        slots = []
        for i, e in enumerate(d["tasks"]):
            e = dict(e)
            try:
                start, end = float(e.pop("start")), float(e.pop("end"))
                slots.append(Slot(Task.from_dict(e), start, end))
            except (KeyError, TypeError) as err:
                raise ScheduleError(f"schedule.tasks[{i}] ({e.get('id', '?')}): {err}") from None
        return cls(slots, dict(d.get("meta") or {}))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.dump(self.to_dict(), Dumper=_DUMPER, sort_keys=False, width=120)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, source: str | Path) -> "Schedule":
        text = Path(source).read_text() if isinstance(source, Path) or "\n" not in str(source) else str(source)
        return cls.from_dict(yaml.load(text, Loader=_LOADER))


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for b, e in sorted(intervals):
        if out and b <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((b, e))
    return out


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two sorted lists of disjoint intervals (a two-pointer sweep)."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _us(t: float) -> str:
    return f"{t * 1e6:.3f} us"
