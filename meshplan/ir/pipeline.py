"""Pipeline: a plan's pipeline stages, the outermost mesh axis `pp`.

Ops are never sharded over pp: each stage runs a contiguous run of transformer layers on its own copy of the
plan's (dp, mp) mesh, so a plan with pipeline stages has pp · dp · mp ranks, rank = stage · (dp · mp) + the rank
inside the stage's mesh. Stage boundaries are layer counts (uneven stages allowed, as the planner prices them):
ops before the first layer (the embedding) belong to stage 0, ops after the last layer (final norm, head) to the
last stage, the same rule as the planner's `pricing.stage_of_ops`.

YAML: `mesh: {pp: 2, dp: 1, mp: 2}` and `pipeline: {layers_per_stage: [3, 1], microbatches: 4, schedule: 1f1b}`
(the `pipeline:` field marks pp as the pipeline axis and may be empty: layers_per_stage defaults to an even
split, microbatches to pp).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import graph as G
from .graph import Graph

AXIS = "pp"
SCHEDULES = ("1f1b", "gpipe")


@dataclass(frozen=True)
class Pipeline:
    stages: int = 1
    layers_per_stage: tuple[int, ...] | None = None  # None: as even as possible, earlier stages one more
    microbatches: int = 1  # per data-parallel rank and step
    schedule: str = "1f1b"

    def __post_init__(self) -> None:
        for name in ("stages", "microbatches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"pipeline.{name}: must be a positive integer, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"pipeline.schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        lps = self.layers_per_stage
        if lps is not None:
            if len(lps) != self.stages or any(not isinstance(n, int) or n < 1 for n in lps):
                raise ValueError(f"pipeline.layers_per_stage: expected {self.stages} positive layer counts "
                                 f"(one per stage), got {list(lps)}")

    @property
    def enabled(self) -> bool:
        return self.stages > 1

    def layer_counts(self, n_layers: int) -> tuple[int, ...]:
        if self.layers_per_stage is not None:
            if sum(self.layers_per_stage) != n_layers:
                raise ValueError(f"pipeline.layers_per_stage: {list(self.layers_per_stage)} sums to "
                                 f"{sum(self.layers_per_stage)}, but the model has {n_layers} layers")
            return self.layers_per_stage
        if n_layers < self.stages:
            raise ValueError(f"pipeline.stages: {self.stages} stages need at least as many layers; the model "
                             f"has {n_layers}")
        base, extra = divmod(n_layers, self.stages)
        return tuple(base + (1 if i < extra else 0) for i in range(self.stages))

    def stage_of(self, graph: Graph) -> dict[str, int]:
        """op name -> its stage (graph inputs: stage 0; the output op: the last stage)."""
        layers = sorted({op.layer for op in graph.ops() if op.layer is not None})
        stage_of_layer, acc = {}, 0
        for k, count in enumerate(self.layer_counts(len(layers))):
            for layer in layers[acc:acc + count]:
                stage_of_layer[layer] = k
            acc += count
        out, seen_layer = {}, False
        for op in graph.ops():
            if op.layer is not None:
                seen_layer = True
                out[op.name] = stage_of_layer[op.layer]
            elif op.kind == G.INPUT:
                out[op.name] = 0
            else:
                out[op.name] = self.stages - 1 if seen_layer or op.kind == G.OUTPUT else 0
        return out

    # ---- YAML --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"microbatches": self.microbatches, "schedule": self.schedule}
        if self.layers_per_stage is not None:
            d = {"layers_per_stage": list(self.layers_per_stage), **d}
        return d

    @classmethod
    def from_dict(cls, stages: int, d: dict | None) -> "Pipeline":
        d = dict(d or {})
        unknown = set(d) - {"layers_per_stage", "microbatches", "schedule"}
        if unknown:
            raise ValueError(f"pipeline.{sorted(unknown)[0]}: unknown field")
        lps = d.get("layers_per_stage")
        if lps is not None and not isinstance(lps, list):
            raise ValueError(f"pipeline.layers_per_stage: expected a list of layer counts, got {lps!r}")
        return cls(stages, tuple(lps) if lps is not None else None, d.get("microbatches", stages),
                   str(d.get("schedule", "1f1b")))
