"""Emit the overlap schedule as a readable Python module that the runtime imports and runs.

For each op the Schedule splits at its collectives (Ulysses attention "sp", expert-parallel MoE "ep"; see
phases.py), the emitted function runs the op's forward tasks for one rank in the schedule's order: both streams'
tasks merged by start time, every all-to-all issued asynchronously where the comm stream starts it
(`start_exchange`/`start_rows`), and its `.wait()` placed just before the first compute task that uses it. So
chunk i's all-to-all is in flight while chunk i+1 routes or projects, and chunk i's experts run while chunk
i-1's combine is in flight (MegaScale-MoE's inter-operator overlap, docs/reference.md "Overlap"). The compute pieces
are runtime/overlap_ops.py; the module maps op names to functions in `OPS`, which ParallelModel.op_overrides
takes (runtime/overlap.py).

Backward: autograd's, through the async collectives' Functions: the mirror all-to-all of each collective is issued
where its gradient first appears and waited for only where autograd needs it, so the interleaved chunks overlap in
the backward as well (runtime/async_collectives.py).

Each line a task produces ends with `# <task id>` (`# wait <task id>` for a wait), which is how
tests/codegen/test_emit.py checks the emitted order against Schedule.program().
"""
from __future__ import annotations

from pathlib import Path

from ..ir import graph as G
from ..ir.graph import Graph
from ..ir.plan import Plan
from ..ir.strategies import (
    CHUNKS,
    COMBINE,
    CORE,
    DISPATCH,
    EXPERTS,
    OUT_A2A,
    OUT_PROJ,
    QKV,
    QKV_A2A,
    ROUTE,
    SHARED,
    STRATEGIES,
    UNPERMUTE,
    runs_async,
)
from .durations import Durations, durations_for
from .phases import COMM, COMPUTE
from .schedule import Schedule, Slot
from .scheduler import list_schedule
from .task_graph import FWD, build_task_graph

# The op kinds split into chunks: the two whose strategies have collectives inside them; how many chunks by default
# (ir/strategies.CHUNKS, runtime/overlap.enable_overlap's default too). The planner prices this schedule
# (planner/overlap.py) from the strategies' `chunked` flags, which EMITTED must match (test_strategy_conformance).
CHUNK_KINDS = {G.ATTENTION, G.MOE}

# phase -> (the statement producing it, with {c} the chunk and {in} the value of the phase it waits for); the
# phase names are the strategies' (ir/strategies), which are also the runtime's channel tags
_ATTENTION = {
    QKV: "qkv{c} = sp_qkv(ctx, x{c})",
    QKV_A2A: f"{QKV_A2A}{{c}} = start_exchange(qkv{{c}}, 2, 1, ctx.channel({QKV_A2A!r}), ctx.comm_stream)",
    CORE: "core{c} = sp_core(ctx, {in})",
    OUT_A2A: f"{OUT_A2A}{{c}} = start_exchange(core{{c}}, 1, 2, ctx.channel({OUT_A2A!r}), ctx.comm_stream)",
    OUT_PROJ: "y{c} = sp_out_proj(ctx, {in})",
}
_MOE = {
    ROUTE: "route{c} = ep_route(ctx, x{c}, keep[{c}])",
    DISPATCH: f"{DISPATCH}{{c}} = start_rows(route{{c}}.rows, route{{c}}.recv, route{{c}}.send, "
              f"ctx.channel({DISPATCH!r}), ctx.comm_stream)",
    EXPERTS: "experts{c} = ep_experts(ctx, route{c}, {in})",
    COMBINE: f"{COMBINE}{{c}} = start_rows(experts{{c}}, route{{c}}.send, route{{c}}.recv, ctx.channel({COMBINE!r}), "
             "ctx.comm_stream)",
    SHARED: "shared{c} = ep_shared(ctx, x{c})",
    UNPERMUTE: "y{c} = ep_unpermute(ctx, route{c}, {in}, {shared})",
}
RECIPES = {(G.ATTENTION, "sp"): _ATTENTION, (G.MOE, "ep"): _MOE}
EMITTED = set(RECIPES)


def _own_collectives(op: G.Op, strategy: str) -> tuple[str, ...]:
    return STRATEGIES[op.kind][strategy].precision_collectives(op)


def overlapped(kind: str, strategy: str, precision: str) -> bool:
    """Whether the emitted code runs a collective of this (kind, strategy) in `precision` asynchronously beside
    another chunk's compute: only emitted strategies, and only uncompressed (a compressed wire format decodes inside
    the runtime's synchronous collectives, so emit_schedule leaves such an op to the executor)."""
    return (kind, strategy) in EMITTED and runs_async(precision)


def _consumes(op: G.Op, strategy: str) -> dict[str, str]:
    """compute phase -> the comm phase whose result it consumes (the strategy's phase order)."""
    specs = STRATEGIES[op.kind][strategy].phases(op, STRATEGIES[op.kind][strategy].native)
    comm = {p.name for p in specs if p.comm}
    return {p.name: a for p in specs if not p.comm for a in p.after if a in comm}


def emit_module(graph: Graph, plan: Plan, batch: int, seq: int, chunks: int = CHUNKS,
                durations: Durations | str = "local") -> str:
    """The module's source for `plan` at this global batch and sequence length, `chunks` chunks per rank."""
    if isinstance(durations, str):
        durations = durations_for(durations, plan.mesh)
    tg = build_task_graph(graph, plan, batch, seq, chunks, CHUNK_KINDS)
    sch = list_schedule(tg, durations).validate(set(tg.tasks))
    return emit_schedule(graph, plan, sch)


def op_program(sch: Schedule, op: str) -> list[Slot]:
    """The op's forward tasks in the order the emitted code runs them: by start time (both streams), each task
    after its dependencies. On a tie a collective goes first: issuing it costs nothing and lets it run during
    the compute task that starts with it."""
    slots = sorted((s for s in sch.slots if s.task.op == op and s.task.direction == FWD),
                   key=lambda s: (s.start, s.task.stream != COMM, s.end))
    ids = {s.id for s in slots}
    out, done = [], set()
    while slots:
        i = next(i for i, s in enumerate(slots) if all(d in done or d not in ids for d in s.task.deps))
        done.add(slots[i].id)
        out.append(slots.pop(i))
    return out


def emit_schedule(graph: Graph, plan: Plan, sch: Schedule) -> str:
    m = sch.meta
    bodies: dict[str, list[str]] = {}  # function source -> ops using it (identical layers share one function)
    skipped: list[str] = []
    for op in graph.ops():
        p = plan.ops.get(op.name)
        if p is None or op.kind not in CHUNK_KINDS:
            continue
        n = plan.mesh.axis_size(p.axis) if p.axis else 1
        if (op.kind, p.strategy) not in EMITTED or n == 1:
            skipped.append(f"{op.name} ({p.strategy}{'' if n > 1 else ', model axis of size 1'})")
            continue
        compressed = sorted(t for t in _own_collectives(op, p.strategy)
                            if not overlapped(op.kind, p.strategy, p.precision.get(t, "fp32")))
        if compressed:
            # A compressed wire format decodes after the bytes arrive, inside the runtime's synchronous
            # collectives (and EP's fused FP8 permute): keep those ops on the executor's implementation.
            skipped.append(f"{op.name} ({p.strategy}, compressed {', '.join(compressed)})")
            continue
        bodies.setdefault("\n".join(_function_body(op, p.strategy, sch, m["chunks"])), []).append(op.name)

    head = [
        f'"""Overlap program for {plan.model} on mesh {plan.mesh}: global batch {m["batch"]}, seq {m["seq"]}, '
        f'{m["chunks"]} chunk(s) per op.',
        "",
        "Generated by meshplan.codegen.emit from the overlap Schedule; do not edit (re-emit instead).",
        f"Schedule ({m.get('durations', '')}): {sch.summary()}.",
        "Forward: async all-to-alls issued where the comm stream starts them, waited on just before first use.",
        "Backward: autograd; each mirror all-to-all issued where its gradient appears, waited for where it is used.",
        "On CUDA each all-to-all is enqueued on the rank's comm stream (ctx.comm_stream) once that stream has waited",
        "for the compute stream; wait() makes the compute stream wait for the comm stream.",
    ]
    if skipped:
        head.append("Run unchunked by the executor (no collective inside the op to overlap, or a compressed one): "
                    + ", ".join(skipped) + ".")
    lines = ["\n".join(head) + '\n"""', "import torch", "",
             "from meshplan.runtime.async_collectives import start_exchange, start_rows",
             "from meshplan.runtime.overlap_ops import (",
             "    ep_experts, ep_keep, ep_route, ep_shared, ep_unpermute, sp_core, sp_out_proj, sp_qkv, split_batch,",
             ")", "", f"BATCH, SEQ, CHUNKS = {m['batch']}, {m['seq']}, {m['chunks']}", ""]
    ops: dict[str, str] = {}
    for body, names in bodies.items():
        fname = names[0].replace(".", "_")
        doc = names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more with the same schedule)"
        lines += ["", f"def {fname}(ctx, x):", f'    """{doc}"""', body, ""]
        ops.update({n: fname for n in names})
    lines += ["", "OPS = {"] + [f"    {n!r}: {f}," for n, f in ops.items()] + ["}", ""]
    return "\n".join(lines)


def _function_body(op: G.Op, strategy: str, sch: Schedule, chunks: int) -> list[str]:
    """The statements of one op, in schedule order. Comments name tasks with `{op}` for the op, so that identical
    layers (same schedule) give identical bodies and share one function."""
    recipe, consumes = RECIPES[(op.kind, strategy)], _consumes(op, strategy)
    program = op_program(sch, op.name)
    c_of = lambda s: 0 if s.task.chunk is None else s.task.chunk  # noqa: E731
    has_shared = any(s.task.phase == SHARED for s in program)
    out = [f"    xs = split_batch(x, {chunks}, ctx.op.name)", "    " + ", ".join(f"x{c}" for c in range(chunks))
           + (", = xs" if chunks == 1 else " = xs")]
    if op.kind == G.MOE:
        out.append(f"    keep = ep_keep(ctx, x, {chunks})  # capacity: decided on the whole batch")
    waited: set[str] = set()
    for s in program:
        c, ph = c_of(s), s.task.phase
        if ph not in recipe:
            raise ValueError(f"emit: no code for phase {ph!r} of {op.name} ({s.id})")
        stmt = recipe[ph]
        value = None
        if s.task.stream == COMPUTE and ph in consumes:
            dep = consumes[ph]
            value = f"got_{dep}{c}"
            comm_id = next(d for d in s.task.deps if sch[d].task.phase == dep)
            if comm_id not in waited:
                out.append(f"    {value} = {dep}{c}.wait()  # wait {_generic(comm_id, op.name)}")
                waited.add(comm_id)
        shared = f"shared{c}" if has_shared else "None"
        out.append("    " + stmt.format(c=c, **{"in": value, "shared": shared}) + f"  # {_generic(s.id, op.name)}")
    out.append("    return torch.cat([" + ", ".join(f"y{c}" for c in range(chunks)) + "], 0)")
    return out


def _generic(task_id: str, op: str) -> str:
    return task_id.replace(op, "{op}")


def emit_for_plan_file(plan_path: str | Path, model_config: str | None = None, *, batch: int | None = None,
                       seq: int | None = None, chunks: int = 2, cluster: str = "local") -> str:
    """`meshplan show --code`: the module for the plan file, on `model_config` (a configs/models NAME or path;
    default: the plan's model). Default batch: two chunks' worth on every data-parallel shard; seq: the model's
    max_seq_len."""
    from ..ir import Plan, trace
    from ..models import build_model, load_config

    plan = Plan.from_yaml(plan_path)
    cfg = load_config(model_config or plan.model)
    big = cfg.n_layers * cfg.dim * cfg.dim > 50_000_000
    graph = trace(build_model(cfg, device="meta" if big else "cpu"))
    plan.validate(graph)
    batch = batch or chunks * plan.mesh.size
    return emit_module(graph, plan, batch, seq or cfg.max_seq_len, chunks, cluster)
