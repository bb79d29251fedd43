"""The planner's subcommands: `meshplan plan`, `meshplan simulate` (`meshplan calibrate` is measure/cli.py).

meshplan/cli.py calls `add_parsers(subparsers)`; each command is also usable alone via its add_*_parser helper.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..cli_args import UsageError, int_at_least, number, positive_int
from ..loading import load_graph


def _options(args, cfg):
    from .pricing import Options

    seq = args.seq or cfg.max_seq_len
    if seq > cfg.max_seq_len:
        raise UsageError(f"--seq: {seq} is longer than the model's max_seq_len {cfg.max_seq_len}")
    if args.global_batch > 1 << 24:
        raise UsageError(f"--global-batch: {args.global_batch} sequences per step is more than 2**24")
    budget = None if args.error_budget is not None and args.error_budget < 0 else args.error_budget
    opts = Options(seq=args.seq or cfg.max_seq_len, zero=not args.no_zero, dp_ops=args.dp_ops,
                   recompute=args.recompute, pricing_only=args.pricing_only)
    if args.error_budget is not None:
        opts.error_budget = budget
    if args.memory_gb is not None:
        opts.mem_limit = args.memory_gb * 1e9
    return opts


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model config: a NAME (tiny, internal-352b, ...), a YAML path, "
                                 "or a Hugging Face config.json (configs/hf/*/config.json)")
    p.add_argument("--cluster", default="h800", help="a cluster: a NAME (h800, h100, h200, local) or a YAML path")
    p.add_argument("--gpus", type=int_at_least(1, 1 << 20), required=True, help="number of GPUs G")
    p.add_argument("--global-batch", type=positive_int, default=720,
                   help="sequences per step (default 720, docs/reference.md)")
    p.add_argument("--seq", type=positive_int, default=None,
                   help="sequence length (default and maximum: the model's max_seq_len)")
    p.add_argument("--error-budget", type=number(), default=None,
                   help="root-sum-square relative error allowed over all collectives (default 0.2; <0: unlimited)")
    p.add_argument("--memory-gb", type=number(0.0, lo_open=True), default=None,
                   help="per-GPU memory limit (default: the cluster's)")
    p.add_argument("--no-zero", action="store_true", help="do not shard optimizer state over data-parallel ranks")
    p.add_argument("--recompute", choices=["auto", "never", "always", "selective"], default="auto",
                   help="activation recomputation: none, selective and full searched (auto, default), never, "
                        "always (full), selective (norms and MoE activations)")
    p.add_argument("--pricing-only", action="store_true",
                   help="also search virtual pipeline stages (interleaved 1F1B), which meshplan's runtime does not "
                        "run; the plan is for pricing (meshplan run refuses it)")
    p.add_argument("--dp-ops", action="store_true", help="also consider ops data parallel on the model axis "
                                                         "(batch-sharded; needs micro-batches of >= mp sequences)")


# ---- plan ------------------------------------------------------------------------------------------------------
def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="choose strategies, precisions and a mesh for a model on a cluster (ILP)",
                              description="Search meshes pp x dp x mp and, per mesh, solve the ILP choosing each "
                                          "op's strategy and each collective's precision; print the per-op table.")
    _common(p)
    p.add_argument("--out", "-o", help="write the plan YAML here")
    p.add_argument("--explain", metavar="OP", help="print the formulas and values behind one op's (or template's) "
                                                   "costs, e.g. layers.0.attention or layers.*.feed_forward")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args) -> int:
    from . import load_cluster, plan_model
    from .explain import explain_op, op_table, stage_table

    t0 = time.perf_counter()
    cluster = load_cluster(args.cluster)
    graph, cfg = load_graph(args.model, lambda name, params: _floor(name, params, cluster, args))
    opts = _options(args, cfg)
    plan, r = plan_model(graph, cluster, args.gpus, args.global_batch, opts)
    plan.validate(graph, batch=r.mesh.b * r.mesh.d, seq=opts.seq, pricing=opts.pricing_only)
    s = plan.meta["planner"]
    print(f"{graph.name} on {args.gpus} x {cluster.name}: mesh {r.mesh}; searched {r.searched} meshes, solved "
          f"{r.solved} ILPs in {r.seconds:.2f} s (total {time.perf_counter() - t0:.2f} s with tracing)")
    print(f"step {s['step_time_s']:.4g} s, {s['tokens_per_s']:,.0f} tokens/s, MFU {100 * s['mfu']:.1f}%, "
          f"{s['memory_gb']:.1f} GB/GPU (limit {r.problem.mem_limit / 1e9:.1f}), bubble {100 * s['bubble']:.1f}%, "
          f"error {s['error']:.3g} (budget {s['error_budget']})\n")
    print(stage_table(r.problem, r.breakdown) + "\n")
    print(op_table(r.problem, r.assignment, r.breakdown))
    if args.explain:
        print("\n" + explain_op(r.cost_model, r.mesh, r.problem, r.assignment, args.explain))
    if args.out:
        plan.to_yaml(args.out)
        print(f"\nwrote {args.out}")
    return 0


def _floor(name: str, total_params: int, cluster, args) -> None:
    """mesh_search's memory floor on the untraced model (the same bound search starts with)."""
    from types import SimpleNamespace

    from .mesh_search import check_memory_floor
    from .pricing import Options

    mem_limit = args.memory_gb * 1e9 if args.memory_gb is not None else None
    check_memory_floor(SimpleNamespace(name=name, total_params=total_params), cluster, args.gpus,
                       Options(mem_limit=mem_limit))


# ---- simulate --------------------------------------------------------------------------------------------------
def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="predict step time, tokens/s, MFU and memory of the planner's plan "
                                               "and the baselines at scale",
                              description="Predict step time, tokens/s, MFU and memory per GPU of the planner's plan, "
                                          "the Megatron-style plan and all-EP/DP.")
    _common(p)
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--breakdown", action="store_true",
                   help="per plan, where the step goes: per layer and micro-batch GEMM, attention, memory-bound, "
                        "exposed comm by collective; per step bubble, gradient sync, optimizer")
    p.set_defaults(func=cmd_simulate)
    return p


def cmd_simulate(args) -> int:
    from . import load_cluster
    from .simulate import simulate, table

    graph, cfg = load_graph(args.model)
    cluster = load_cluster(args.cluster)
    opts = _options(args, cfg)
    rows = simulate(graph, cluster, args.gpus, args.global_batch, opts)
    print(f"{graph.name}: {args.gpus} x {cluster.name}, global batch {args.global_batch} x {opts.seq} tokens")
    print(table(rows))
    if args.breakdown:
        from .breakdown import table as parts_table
        for r in rows:
            if r.parts:
                print("\n" + parts_table(f"{r.name} {r.mesh}", r.parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1, default=str)
    return 0


def add_parsers(subparsers) -> None:
    add_plan_parser(subparsers)
    add_simulate_parser(subparsers)


def main(argv=None) -> int:
    """Standalone use: python -m meshplan.planner.cli plan tiny --gpus 4."""
    from ..cli_args import standalone

    return standalone("meshplan-planner", add_parsers, argv)


if __name__ == "__main__":
    sys.exit(main())
