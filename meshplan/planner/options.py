"""What a pricing is asked about: the mesh (MeshConfig: model axis, data parallel, pipeline, micro-batches,
recomputation) and the options of the model and the schedule being priced (Options)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.mesh import Mesh
from .overlap import MESHPLAN, Overlap

DEFAULT_ERROR_BUDGET = 0.2  # root-sum-square relative error over all collectives of one step (problem.py)
# Megatron --recompute-modules that selective recompute prices (plan_settings.selective): meshplan's default is
# norms + MoE activations; a published recipe may name others (mla_up_proj, mlp)
DEFAULT_MODULES = ("layernorm", "moe_act")
SELECTIVE_MODULES = ("layernorm", "moe_act", "mla_up_proj", "mlp")


@dataclass(frozen=True)
class MeshConfig:
    n: int  # model axis (mp)
    d: int  # data parallel
    pp: int = 1
    b: int = 1  # micro-batch: sequences per data-parallel replica
    m: int = 1  # micro-batches per step
    recompute: bool = False  # full activation recomputation (memory.checkpoint_bytes)
    selective: bool = False  # selective recompute of norms and MoE activations (plan_settings; not with full)
    # Megatron-only settings (priced, not run by meshplan's runtime: Plan.validate refuses them; plan_settings.py):
    vp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B)
    fold: int = 0  # MoE parallel folding: non-MoE ops on a `fold`-wide sub-axis of mp (0: off)
    # Megatron-Core executes the plan: what its grouped experts and full recompute keep for backward (plan_settings)
    megatron: bool = False
    modules: tuple[str, ...] = DEFAULT_MODULES  # what selective recompute reruns (Megatron's --recompute-modules)

    def __post_init__(self):
        bad = [m for m in self.modules if m not in SELECTIVE_MODULES]
        if bad:
            raise ValueError(f"plan.meta.recompute_modules: {bad[0]!r} is not one of {', '.join(SELECTIVE_MODULES)}")

    @property
    def granularity(self) -> str:
        """Megatron's --recompute-granularity: full | selective | none."""
        return "full" if self.recompute else "selective" if self.selective else "none"

    @property
    def gpus(self) -> int:
        return self.n * self.d * self.pp

    @property
    def mesh(self) -> Mesh:
        return Mesh.of(dp=self.d, mp=self.n)

    def __str__(self) -> str:
        rc = {"full": ", recompute", "selective": ", selective recompute", "none": ""}[self.granularity]
        vp = f" vp={self.vp}" if self.vp > 1 else ""
        fold = f" (MoE folding: non-MoE ops on mp={self.fold})" if self.fold else ""
        return f"pp={self.pp}{vp} dp={self.d} mp={self.n}{fold} (micro-batch {self.b} x {self.m}{rc})"


@dataclass
class Options:
    seq: int = 8192
    # What the schedule running the plan overlaps, per collective (overlap.py): meshplan's codegen + runtime by
    # default; a baseline plan's meta states its system's flags (plans.price_plan)
    overlap: Overlap = field(default_factory=lambda: MESHPLAN)
    error_budget: float | None = DEFAULT_ERROR_BUDGET
    zero: bool = True
    mem_limit: float | None = None  # bytes; None: the cluster's
    # Also offer each op the `dp` candidate: data parallel on the model axis too (batch-sharded, Plan axis None),
    # reached from sequence-sharded neighbours by an all-to-all. Off by default: it needs micro-batches of >= n
    # sequences per replica, and keeps the search to ir/strategies' one-model-axis strategies.
    dp_ops: bool = False
    # activation recomputation: "auto" (none, selective and full searched), "never", "always" (full), "selective"
    recompute: str = "auto"
    # The dtype activations are in (fp32 | bf16): collectives in another format pay an encode and a decode.
    # None: the cluster's activation_dtype. compile() passes the model's.
    activation_dtype: str | None = None
    # The run forces an even token distribution over experts (Megatron-Bridge's benchmarks do): EP pays no
    # router imbalance (cost_model.ep_imbalance).
    balanced_routing: bool = False
    # The GEMMs' input format: bf16, or fp8 (FP8 training, e.g. Transformer Engine recipes): GEMMs on the FP8 peak,
    # their activation operands cast in HBM (kernels.train_seconds). Needs a cluster with a kernel model.
    gemm_dtype: str = "bf16"
    # How EP's dispatch/combine cross nodes: "all_to_all" (NCCL, and meshplan's runtime: every routed copy over the
    # NIC) or "deepep" (DeepEP's hierarchical dispatch: once per destination node, then NVLink forwarding).
    ep_dispatch: str = "all_to_all"
    # The free search may also pick virtual pipeline stages, which meshplan's runtime does not run
    # (plan_settings.py): the plan is then for pricing only (Plan.validate refuses it).
    pricing_only: bool = False
