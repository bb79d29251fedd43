"""`meshplan schedule`: the overlap schedule of a plan's training step, as a table and a Gantt chart."""
from __future__ import annotations

from pathlib import Path

from ..cli_args import PLOT_HINT, UsageError, have, int_at_least, positive_int
from ..ir import graph as G
from ..table import format_table
from .schedule import Schedule, ScheduleError
from .task_graph import TaskGraphError


def schedule_table(sch: Schedule) -> str:
    """One row per task in start order; dependencies by row number, so a row's inputs are easy to find."""
    row = {s.id: i for i, s in enumerate(sch.slots)}
    rows = [[i, s.id, s.task.stream, f"{s.start * 1e6:.2f}", f"{s.end * 1e6:.2f}",
             " ".join(f"#{row[d]}" for d in s.task.deps)] for i, s in enumerate(sch.slots)]
    return format_table(["#", "task", "stream", "start (us)", "end (us)", "deps"], rows, align="rllrrl")


def comparison_table(schedules: dict[str, Schedule], lower_bound: float) -> str:
    rows = [[label, f"{s.makespan * 1e6:.1f}", f"{s.exposed_comm * 1e6:.1f}", f"{s.busy('comm') * 1e6:.1f}",
             f"{s.busy('compute') * 1e6:.1f}", len(s.slots), s.meta.get("policy", "")]
            for label, s in schedules.items()]
    out = format_table(["schedule", "makespan (us)", "exposed comm (us)", "comm busy (us)", "compute busy (us)",
                        "tasks", "policy"], rows, align="lrrrrrl")
    return out + f"\ncritical-path lower bound of the last: {lower_bound * 1e6:.1f} us"


def cmd_schedule(args) -> int:
    from ..ir import Plan, trace
    from ..ir.plan import check_model
    from ..loading import load_model
    from ..models import ConfigError
    from .durations import durations_for
    from .scheduler import compare, critical_path
    from .task_graph import build_task_graph

    if args.png and not have("matplotlib"):
        return _error(f"--png: {PLOT_HINT}")
    kinds = None if args.chunk_kinds == "all" else set(args.chunk_kinds.split(","))
    if kinds is not None and (bad := kinds - set(G.OP_KINDS)):
        return _error(f"--chunk-kinds: unknown op kind {sorted(bad)[0]!r} (kinds: all, {', '.join(G.OP_KINDS[2:])})")
    plan = Plan.from_yaml(Path(args.plan))
    try:
        durations = durations_for(args.cluster, plan.mesh)
    except ValueError as e:
        if isinstance(e, ConfigError):  # a malformed cluster file: main() prints it
            raise
        return _error(f"--cluster: {e}")
    model = load_model(args.model)
    seq = args.seq or model.config.max_seq_len
    if seq > model.config.max_seq_len:
        return _error(f"--seq: {seq} is longer than the model's max_seq_len {model.config.max_seq_len}")
    graph = trace(model)
    check_model(plan, graph)
    try:
        runs = compare(graph, plan, args.batch, seq, durations, args.chunks, kinds)
        split = build_task_graph(graph, plan, args.batch, seq, args.chunks, kinds)
        for sch in runs.values():
            sch.validate()
    except (TaskGraphError, ScheduleError) as e:
        return _error(str(e))
    c = args.chunks
    labelled = {f"overlap, {c} chunks": runs["overlap"]} if c > 1 else {}
    labelled.update({"overlap, 1 chunk": runs["overlap_c1"], "sequential, 1 chunk": runs["sequential"]})
    best = runs["overlap"]
    print(f"schedule of {plan.model} on mesh {plan.mesh}: batch {args.batch}, seq {seq}, {c} chunk(s) of "
          f"{args.chunk_kinds} ops; durations: {_describe(durations)}")
    print(schedule_table(best))
    print()
    print(comparison_table(labelled, critical_path(split, durations)))
    seq_s = runs["sequential"]
    print(f"overlap vs sequential: makespan {_pct(best.makespan, seq_s.makespan)}, exposed comm "
          f"{_pct(best.exposed_comm, seq_s.exposed_comm)}")
    if c > 1 and runs["overlap_c1"].makespan < best.makespan:
        print(f"note: {c} chunks are slower than 1 here: each chunk pays every collective's latency again")
    if args.png:
        from .gantt import plot_gantt

        plot_gantt(labelled, args.png, f"{plan.model} on {plan.mesh}, batch {args.batch}, seq {seq}, "
                                        f"{_describe(durations)}")
        print(f"wrote {args.png}")
    if args.out:
        best.to_yaml(args.out)
        print(f"wrote {args.out}")
    if args.code:
        from .emit import emit_module

        print()
        print(emit_module(graph, plan, args.batch, seq, c, durations))
    return 0


def _describe(durations) -> str:
    from .durations import Roofline

    return f"roofline preset {durations.name}" if isinstance(durations, Roofline) else str(durations.name)


def _pct(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.1f}%" if old else "n/a"


def _error(msg: str) -> int:
    raise UsageError(msg)


def add_parsers(sub) -> None:
    from .durations import ROOFLINES

    s = sub.add_parser("schedule", help="schedule a plan's training step on compute and comm streams (overlap)",
                       description="List-schedule a plan's training step, split into micro-batch chunks, onto a "
                                   "compute and a comm stream; compare with sequential; draw a Gantt chart.")
    s.add_argument("plan", help="a plan YAML file")
    s.add_argument("--model", required=True, help="model config: a NAME (tiny, ...) or a YAML path")
    s.add_argument("--batch", type=positive_int, default=8, help="global batch size (default 8)")
    s.add_argument("--seq", type=positive_int, default=None,
                   help="sequence length (default and maximum: the model's max_seq_len)")
    s.add_argument("--chunks", type=int_at_least(1, 64), default=2,
                   help="micro-batch chunks to split ops into (default 2)")
    s.add_argument("--chunk-kinds", default="all",
                   help="comma-separated op kinds to split into chunks, e.g. moe,attention (default: all)")
    s.add_argument("--cluster", default="h800",
                   help=f"cost model: the planner's for configs/clusters/NAME.yaml (or a cluster YAML path), else a "
                        f"roofline preset ({', '.join(ROOFLINES)}); default h800")
    s.add_argument("--png", help="write a Gantt chart of the schedules here")
    s.add_argument("--out", help="write the overlap schedule as YAML here")
    s.add_argument("--code", action="store_true",
                   help="also print the Python module emitted for this schedule (what the runtime runs)")
    s.set_defaults(func=cmd_schedule)
