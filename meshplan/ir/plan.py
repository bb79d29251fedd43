"""Plan: per op, a strategy on a model axis, input/output placements per mesh axis, and collective precisions.

The planner writes Plans; codegen and runtime read them; users may write or edit them as YAML. A Plan is data:
`Plan.to_yaml` / `Plan.from_yaml` round-trip it losslessly, and `Plan.validate(graph)` rejects a plan that does
not fit the model with one PlanError naming the field and the constraint.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import sympy
import yaml

from ..inputs import check_str, mapping, parse_yaml, read_yaml
from . import graph as G
from .graph import Graph, Op
from .mesh import Mesh
from .pipeline import AXIS as PP_AXIS
from .pipeline import Pipeline
from .placement import Partial, Placement, Replicate, Shard, parse_placement
from .strategies import (
    BATCH,
    STRATEGIES,
    allowed_precisions,
    batch_parallel_error,
    collective_names,
    default_strategy,
    divisibility_error,
    layout_error,
    native_io,
    offered_error,
)

FORMAT_VERSION = 1
MAX_RANKS = 1 << 20  # a mesh larger than any machine is a typo, not a plan


class PlanError(ValueError):
    """A plan does not fit its model or mesh. The message names the field: plan.ops['layers.3.attention'].axis."""


@dataclass
class OpPlan:
    strategy: str
    axis: str | None  # the model axis the strategy splits over (None: data parallel on every axis)
    input: tuple[Placement, ...]  # placement of every input, one per mesh axis
    output: tuple[Placement, ...]
    precision: dict[str, str] = field(default_factory=dict)  # collective name -> fp32 | bf16 | fp8 (default fp32)

    def to_dict(self) -> dict:
        d = {"strategy": self.strategy, "axis": self.axis, "input": [str(p) for p in self.input],
             "output": [str(p) for p in self.output]}
        if self.precision:
            d["precision"] = dict(sorted(self.precision.items()))
        return d


@dataclass
class Plan:
    model: str
    mesh: Mesh
    ops: dict[str, OpPlan]
    meta: dict = field(default_factory=dict)  # free-form provenance (planner objective, cluster, ...)
    # Pipeline stages: the outermost mesh axis pp (YAML mesh: {pp: 2, dp: .., mp: ..}); `mesh` is one stage's.
    pipeline: Pipeline = field(default_factory=Pipeline)

    @property
    def world_size(self) -> int:
        """Ranks the plan runs on: pp stages of mesh.size ranks each."""
        return self.pipeline.stages * self.mesh.size

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def build(cls, graph: Graph, mesh: Mesh, strategies: dict[str, str] | None = None, axis: str | None = "auto",
              precision: dict[str, str] | None = None, fallback: bool = True) -> "Plan":
        """A plan that gives each op its strategy's native placements. `strategies` maps an op name, template
        ("layers.*.attention") or kind ("attention") to a strategy; unnamed ops get DEFAULT_STRATEGY. `axis` is
        the model axis: "auto" is the mesh's last (innermost) axis; None makes every axis data parallel (pure DP:
        batch-sharded everywhere, strategies moot). `precision` maps collective names to dtypes for every op that
        has that collective. fallback=False: a template or kind entry is applied to every op it names, and
        validate() refuses the ops it cannot run exactly (what a user's explicit compile(strategies=) wants)."""
        strategies = strategies or {}
        axis = mesh.names[-1] if axis == "auto" else axis
        if axis is not None and axis not in mesh.names:
            raise PlanError(f"plan.axis: {axis!r} is not a mesh axis (axes: {list(mesh.names)})")
        ops, fallbacks = {}, []
        for op in graph.ops():
            if op.kind in (G.INPUT, G.OUTPUT):
                continue
            name = strategies.get(op.name)
            broad = strategies.get(op.template) or strategies.get(op.kind) if name is None else None
            sharded = axis is not None and mesh.axis_size(axis) > 1
            if fallback and broad is not None and broad in STRATEGIES[op.kind] and sharded \
                    and (why := offered_error(op, broad)):
                # A template or kind entry covers ops it cannot run exactly: they take the exact default (said
                # in meta.fallbacks); an entry naming the op itself is kept, and validate() refuses it.
                fallbacks.append(f"{op.name}: {broad} -> {default_strategy(op)} ({why})")
                broad = default_strategy(op)
            name = name or broad
            if name is None:  # the kind's default where meshplan runs it exactly, else the op runs whole
                name = default_strategy(op, sharded)
            strat = STRATEGIES[op.kind].get(name)
            if strat is None:
                raise PlanError(f"plan.ops[{op.name!r}].strategy: {name!r} is not valid for {op.kind} "
                                f"(valid: {', '.join(STRATEGIES[op.kind])})")
            i, o = native_io(op, name)
            on_axis = lambda p: tuple(p if a == axis else BATCH for a in mesh.names)  # noqa: E731
            prec = {c: precision[c] for c in collective_names(op, name) if precision and c in precision}
            ops[op.name] = OpPlan(name, axis, on_axis(i), on_axis(o), prec)
        return cls(graph.name, mesh, ops, {"fallbacks": fallbacks} if fallbacks else {})

    # ---- YAML ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        mesh = self.mesh.to_dict()
        if self.pipeline.enabled:
            mesh = {PP_AXIS: self.pipeline.stages, **mesh}
        d = {"meshplan_plan": FORMAT_VERSION, "model": self.model, "mesh": mesh}
        if self.pipeline.enabled:
            d["pipeline"] = self.pipeline.to_dict()
        d["ops"] = {name: op.to_dict() for name, op in self.ops.items()}
        if self.meta:
            d["meta"] = self.meta
        return d

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict):
            raise PlanError(f"plan: expected a mapping at the top level, got {type(d).__name__}")
        unknown = set(d) - {"meshplan_plan", "model", "mesh", "ops", "meta", "pipeline"}
        if unknown:
            raise PlanError(f"plan.{sorted(unknown)[0]}: unknown field")
        if d.get("meshplan_plan", FORMAT_VERSION) != FORMAT_VERSION:
            raise PlanError(f"plan.meshplan_plan: format {d['meshplan_plan']!r} unsupported "
                            f"(expected {FORMAT_VERSION})")
        for key in ("model", "mesh", "ops"):
            if key not in d:
                raise PlanError(f"plan.{key}: missing")
        check_str("plan.model", d["model"], PlanError)
        try:
            mesh, pipeline = _split_pipeline(d["mesh"], d.get("pipeline"))
        except ValueError as e:
            raise PlanError(f"plan.{e}") from None
        if mesh.size > MAX_RANKS:
            raise PlanError(f"plan.mesh: {mesh} has {mesh.size} ranks, more than {MAX_RANKS}")
        if d.get("meta") is not None and not isinstance(d["meta"], dict):
            raise PlanError(f"plan.meta: expected a mapping, got {type(d['meta']).__name__}")
        if not isinstance(d["ops"], dict):
            raise PlanError("plan.ops: expected a mapping op name -> entry")
        ops = {}
        for name, e in d["ops"].items():
            where = f"plan.ops[{name!r}]"
            if not isinstance(e, dict):
                raise PlanError(f"{where}: expected a mapping")
            extra = set(e) - {"strategy", "axis", "input", "output", "precision"}
            if extra:
                raise PlanError(f"{where}.{sorted(extra)[0]}: unknown field")
            for key in ("strategy", "input", "output"):
                if key not in e:
                    raise PlanError(f"{where}.{key}: missing")
            placements = {}
            for key in ("input", "output"):
                if not isinstance(e[key], list) or len(e[key]) != len(mesh.axes):
                    raise PlanError(f"{where}.{key}: expected a list of {len(mesh.axes)} placements, one per mesh "
                                    f"axis {list(mesh.names)}, got {e[key]!r}")
                try:
                    placements[key] = tuple(parse_placement(p) for p in e[key])
                except ValueError as err:
                    raise PlanError(f"{where}.{key}: {err}") from None
            precision = e.get("precision") or {}
            if not isinstance(precision, dict):
                raise PlanError(f"{where}.precision: expected a mapping collective -> dtype")
            _check_entry_types(where, e, precision)
            ops[name] = OpPlan(str(e["strategy"]), e.get("axis"), placements["input"], placements["output"],
                               {str(k): str(v) for k, v in precision.items()})
        return cls(str(d["model"]), mesh, ops, dict(d.get("meta") or {}), pipeline)

    @classmethod
    def from_yaml(cls, source: str | Path) -> "Plan":
        """A path to a YAML file, or YAML text."""
        if isinstance(source, Path) or ("\n" not in str(source) and Path(str(source)).exists()):
            d = read_yaml(source, "plan", PlanError)
            return cls.from_dict(mapping(f"plan {str(source)!r}", d, PlanError))
        if "\n" not in str(source) and str(source).endswith((".yaml", ".yml")):
            raise PlanError(f"plan {str(source)!r}: no such file")
        return cls.from_dict(parse_yaml(str(source), "plan", PlanError))

    # ---- validation -----------------------------------------------------------------------------------
    def validate(self, graph: Graph, batch: int | None = None, seq: int | None = None,
                 pricing: bool = False) -> "Plan":
        """Check the plan against the model's IR (and, when given, the run's batch and sequence sizes). pricing:
        the plan is only priced (meshplan simulate), so settings meshplan's runtime does not run are allowed."""
        if not pricing and (err := pricing_only_error(self.meta)):
            raise PlanError(err)
        recompute_granularity(self.meta)
        ops = {op.name: op for op in graph.ops() if op.kind not in (G.INPUT, G.OUTPUT)}
        for name in self.ops:
            if name not in ops:
                close = difflib.get_close_matches(name, list(ops), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PlanError(f"plan.ops[{name!r}]: no such op in model {graph.name!r}{hint}")
        for name, op in ops.items():
            if name not in self.ops:
                raise PlanError(f"plan.ops[{name!r}]: missing (every op of the model needs an entry)")
            self._validate_op(op, self.ops[name], batch, seq)
            self._validate_sound(op, self.ops[name])
        self._validate_edges(graph)
        if self.pipeline.enabled:
            try:
                self.pipeline.stage_of(graph)
            except ValueError as e:
                raise PlanError(f"plan.{e}") from None
        return self

    def _validate_sound(self, op: Op, p: OpPlan) -> None:
        """The op computes exactly what it does on one device: its strategy is one meshplan runs for it, and
        it is data parallel only where it is batch-wise."""
        where = f"plan.ops[{op.name!r}]"
        k = self.mesh.index(p.axis) if p.axis is not None else None
        io = (p.input[k], p.output[k]) if k is not None else None
        if err := offered_error(op, p.strategy, io, sharded=k is not None and self.mesh.axis_size(p.axis) > 1):
            raise PlanError(f"{where}.strategy: {err}")
        for axis, size in self.mesh.axes:
            if size > 1 and p.input[self.mesh.index(axis)] == BATCH and (err := batch_parallel_error(op)):
                raise PlanError(f"{where}: mesh axis {axis}={size} is data parallel for this op, but {err}")

    def _validate_edges(self, graph: Graph) -> None:
        """Every edge whose placements differ is a resharding of the producer's tensor, so the tensor must be
        laid out as both placements assume (B leading dim 0, S dim 1); no consumer reads a Partial sum."""
        for op in graph.ops():
            if op.kind == G.INPUT:
                continue
            for i, src in enumerate(op.inputs):
                src_op = graph.op(src)
                if "param" in src_op.attrs or (op.kind == G.OUTPUT and src not in self.ops):
                    continue
                dst = self._replicated() if op.kind == G.OUTPUT else self.ops[op.name].input
                frm = self._replicated() if src_op.kind == G.INPUT else self.ops[src].output
                for (axis, size), a, b in zip(self.mesh.axes, frm, dst):
                    if size == 1 or a == b:
                        continue
                    where = f"plan.ops[{op.name!r}].input[{i}]" if op.kind != G.OUTPUT else "the model's output"
                    if isinstance(b, Partial):
                        raise PlanError(f"{where}: reads {src!r}'s value as a Partial sum on axis {axis}")
                    for pl in (a, b):
                        if err := layout_error(src_op.output, pl):
                            raise PlanError(f"{where}: resharding {src!r} {a} -> {b} on axis {axis}, but {err}")

    def _replicated(self) -> tuple[Placement, ...]:
        return tuple(Replicate() for _ in self.mesh.axes)

    def _validate_op(self, op: Op, p: OpPlan, batch: int | None, seq: int | None) -> None:
        where = f"plan.ops[{op.name!r}]"
        valid = STRATEGIES[op.kind]
        if p.strategy not in valid:
            raise PlanError(f"{where}.strategy: {p.strategy!r} is not valid for {op.kind} (valid: {', '.join(valid)})")
        strat = valid[p.strategy]
        if p.axis is not None and p.axis not in self.mesh.names:
            raise PlanError(f"{where}.axis: {p.axis!r} is not a mesh axis (axes: {list(self.mesh.names)})")
        for axis, size in self.mesh.axes:
            i, o = p.input[self.mesh.index(axis)], p.output[self.mesh.index(axis)]
            if axis == p.axis:
                if (i, o) not in strat.io:
                    allowed = " or ".join(f"{a} -> {b}" for a, b in strat.io)
                    raise PlanError(f"{where}: on its model axis {axis}, strategy {p.strategy} takes {allowed}, "
                                    f"not {i} -> {o}")
                if err := divisibility_error(op, p.strategy, axis, size):
                    raise PlanError(f"{where}: {err}")
            elif (i, o) != (BATCH, BATCH) and size > 1:
                raise PlanError(f"{where}: mesh axis {axis} is data parallel for this op, so its input and output "
                                f"must be {BATCH} (batch-sharded), not {i} -> {o}")
        for key in ("input", "output"):
            self._check_sizes(f"{where}.{key}", getattr(p, key), batch, seq)
        names = collective_names(op, p.strategy)
        for c, dtype in p.precision.items():
            if c not in names:
                raise PlanError(f"{where}.precision.{c}: no such collective for {op.kind}/{p.strategy} "
                                f"(has: {', '.join(names) or 'none'})")
            if dtype not in allowed_precisions(c):
                raise PlanError(f"{where}.precision.{c}: {dtype!r} not allowed (allowed: "
                                f"{', '.join(allowed_precisions(c))})")

    def _check_sizes(self, where: str, placements: tuple[Placement, ...], batch: int | None,
                     seq: int | None) -> None:
        """Every sharded dim must divide by the product of the axes sharding it (dim 0 batch, dim 1 sequence)."""
        for dim, label, size_of_dim in ((0, "batch size", batch), (1, "sequence length", seq)):
            axes = [(a, n) for (a, n), p in zip(self.mesh.axes, placements) if p == Shard(dim) and n > 1]
            total = 1
            for _, n in axes:
                total *= n
            if axes and size_of_dim is not None and size_of_dim % total:
                names = " x ".join(f"{a}={n}" for a, n in axes)
                raise PlanError(f"{where}: mesh axis {names} does not divide the {label} {size_of_dim}")

    # ---- views ------------------------------------------------------------------------------------------
    def reshards(self, graph: Graph) -> list[tuple[str, str, int, tuple[Placement, ...], tuple[Placement, ...]]]:
        """(producer, consumer, input index, producer's output placement, consumer's input placement) for every
        edge whose placements differ: the collectives the plan implies between ops. Graph inputs (token ids) are
        loaded by each rank as its first consumer wants them, so they never reshard."""
        out = []
        for op in graph.ops():
            if op.name not in self.ops:
                continue
            for idx, src in enumerate(op.inputs):
                if src not in self.ops:
                    continue
                src_p, dst_p = self.ops[src].output, self.ops[op.name].input
                if src_p != dst_p:
                    out.append((src, op.name, idx, src_p, dst_p))
        return out

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for p in self.ops.values():
            key = f"{p.strategy}"
            counts[key] = counts.get(key, 0) + 1
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        mesh = f"(pp={self.pipeline.stages}, {str(self.mesh)[1:]}" if self.pipeline.enabled else str(self.mesh)
        return f"plan for {self.model} on mesh {mesh}: {len(self.ops)} ops ({parts})"


RECOMPUTE = ("none", "selective", "full")  # plan.meta.activation_recompute: what the planner prices and runs


def recompute_granularity(meta: dict | None) -> str:
    """plan.meta.activation_recompute ("none" when absent), or PlanError naming the field."""
    granularity = (meta or {}).get("activation_recompute", "none")
    if granularity not in RECOMPUTE:
        raise PlanError(f"plan.meta.activation_recompute: {granularity!r} is not one of {', '.join(RECOMPUTE)}")
    return granularity


def pricing_only_error(meta: dict) -> str | None:
    """Why meshplan's runtime cannot run a plan whose meta asks for a Megatron-only setting (planner/plan_settings.py:
    priced by meshplan simulate, never executed), or None."""
    pipe = meta.get("pipeline") if isinstance(meta.get("pipeline"), dict) else {}
    if pipe.get("virtual_stages", 1) != 1:
        return (f"plan.meta.pipeline.virtual_stages: {pipe['virtual_stages']} is priced only (meshplan simulate); "
                f"meshplan's runtime runs one pipeline stage per rank (use 1)")
    if meta.get("moe_folding"):
        return ("plan.meta.moe_folding: MoE parallel folding is priced only (meshplan simulate); meshplan's runtime "
                "runs every op on the plan's one model axis (remove it)")
    if meta.get("executor", "meshplan") != "meshplan":
        return (f"plan.meta.executor: {meta['executor']!r} is priced only (meshplan simulate); meshplan's runtime "
                "runs the plan as meshplan (remove it)")
    return None


def _split_pipeline(mesh: dict, pipeline: dict | None) -> tuple[Mesh, Pipeline]:
    """YAML mesh {pp: P, dp: .., mp: ..} with a `pipeline:` field -> (the stage mesh, Pipeline(P, ...)). Without
    the field, an axis named pp is an ordinary mesh axis (plans written before pipelines ran)."""
    if pipeline is None:
        return Mesh.from_dict(mesh), Pipeline()
    if not isinstance(pipeline, dict):
        raise ValueError(f"pipeline: expected a mapping, got {pipeline!r}")
    if not isinstance(mesh, dict) or PP_AXIS not in mesh:
        raise ValueError(f"mesh.{PP_AXIS}: a plan with a pipeline field needs the pipeline axis in its mesh, "
                         f"got {mesh!r}")
    if next(iter(mesh)) != PP_AXIS:
        raise ValueError(f"mesh.{PP_AXIS}: the pipeline axis must come first (outermost), got {list(mesh)}")
    rest = {k: v for k, v in mesh.items() if k != PP_AXIS}
    return Mesh.from_dict(rest or {"dp": 1}), Pipeline.from_dict(mesh[PP_AXIS], pipeline)


def _check_entry_types(where: str, e: dict, precision: dict) -> None:
    """Load-time types of one ops entry: names are strings, the axis a string or null."""
    check_str(f"{where}.strategy", e["strategy"], PlanError)
    if e.get("axis") is not None:
        check_str(f"{where}.axis", e["axis"], PlanError)
    for k, v in precision.items():
        check_str(f"{where}.precision.{k}", v, PlanError)


def check_model(plan: Plan, graph: Graph) -> None:
    """The plan was written for this model: plan.model must equal the model's name (a plan for mixtral-8x7b is
    never validated against tiny, even where the op names happen to agree)."""
    if plan.model != graph.name:
        raise PlanError(f"plan.model: the plan is for {plan.model!r} but the model is {graph.name!r} (plan this "
                        f"model, or set plan.model if the architecture is the same)")


def evaluate_shape(shape, batch: int, seq: int) -> tuple[int, ...]:
    return tuple(int(sympy.sympify(d).subs({G.B: batch, G.S: seq})) for d in shape)
