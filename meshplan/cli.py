"""The `meshplan` command: trace, show, plan, simulate, calibrate, run, schedule, train.

Each stage owns its subcommands (planner/cli.py, runtime/launch.py, ...); this file only wires them up, so that
`meshplan --help` lists everything a user can do.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .cli_args import Parser, UsageError, positive_int, run_command
from .loading import load_model
from .table import format_table


# ---- trace -------------------------------------------------------------------------------------------------
def trace_table(graph, batch: int, seq: int) -> str:
    from .ir.graph import human

    rows = []
    for op in graph.ops():
        ins = ", ".join(str(m) for m in op.input_metas)
        rows.append([op.name, op.kind, ins, str(op.output) if op.output else "", str(op.flops),
                     human(graph.evaluate(op.flops, batch, seq)), human(op.params)])
    return format_table(["op", "kind", "inputs", "output", "FLOPs (fwd)", f"@B={batch},S={seq}", "params"], rows,
                        align="lllllrr")


def cmd_trace(args) -> int:
    from .ir import trace
    from .ir.graph import human

    model = load_model(args.config, args.head)
    if args.verbose:
        from .models.config import defaults_used

        used = ", ".join(f"{k}={v}" for k, v in defaults_used(args.config).items())
        print(f"model config {args.config}: defaults used for {used or 'nothing'}")
    seq = args.seq or model.config.max_seq_len
    if seq > model.config.max_seq_len:
        raise UsageError(f"--seq: {seq} is longer than the model's max_seq_len {model.config.max_seq_len}")
    graph = trace(model)
    print(trace_table(graph, args.batch, seq))
    tokens = args.batch * seq
    fwd = graph.evaluate(graph.total_flops, args.batch, seq)
    print(f"\n{graph.name}: {len(graph)} ops, {graph.n_layers()} layers")
    print(f"total parameters:            {graph.total_params:,} ({human(graph.total_params)})")
    print(f"activated parameters/token:  {graph.active_params:,} ({human(graph.active_params)})")
    print(f"forward FLOPs at B={args.batch}, S={seq}: {human(fwd)} ({human(fwd / tokens)} per token; "
          f"training ~3x)")
    return 0


# ---- show --------------------------------------------------------------------------------------------------
def plan_rows(plan) -> list[list[str]]:
    """One row per run of identical layers: layers.[0-59].attention stands for 60 equal entries."""
    from .ir.graph import Op

    rows: list[list[str]] = []
    runs: list[tuple[str, list[int], dict]] = []
    for name, p in plan.ops.items():
        op = Op(name, "generic", [], [], None)
        d = p.to_dict()
        if runs and op.layer is not None and runs[-1][0] == op.template and runs[-1][2] == d:
            runs[-1][1].append(op.layer)
            continue
        runs.append((op.template if op.layer is not None else name, [op.layer] if op.layer is not None else [], d))
    # Merge runs that repeat the same template across consecutive layers (layer 0's ops, then layer 1's, ...).
    merged: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for template, layers, d in runs:
        key = (template, repr(d))
        if key not in merged:
            merged[key] = []
            order.append((template, d))
        merged[key].extend(layers)
    for template, d in order:
        layers = sorted(merged[(template, repr(d))])
        name = template.replace("*", _ranges(layers)) if layers else template
        prec = ", ".join(f"{k}={v}" for k, v in (d.get("precision") or {}).items())
        rows.append([name, d["strategy"], d["axis"] or "-", " ".join(d["input"]), " ".join(d["output"]), prec or "-"])
    return rows


def _ranges(xs: list[int]) -> str:
    if len(xs) == 1:
        return str(xs[0])
    if xs == list(range(xs[0], xs[-1] + 1)):
        return f"[{xs[0]}-{xs[-1]}]"
    return "[" + ",".join(map(str, xs)) + "]"


def cmd_show(args) -> int:
    from .ir import Plan, trace
    from .ir.plan import check_model, pricing_only_error

    plan = Plan.from_yaml(Path(args.plan))
    if args.model:
        graph = trace(load_model(args.model))
        check_model(plan, graph)
        plan.validate(graph, pricing=True)
    print(f"plan for {plan.model} on mesh {plan.mesh} ({plan.mesh.size} ranks)")
    if err := pricing_only_error(plan.meta):  # shown, but meshplan run refuses it
        print(f"  not runnable: {err}")
    for k, v in plan.meta.items():
        print(f"  {k}: {v}")
    print(format_table(["op", "strategy", "axis", f"input {list(plan.mesh.names)}", "output", "precision"],
                       plan_rows(plan), align="llllll"))
    if getattr(args, "code", False):
        codegen = _optional("meshplan.codegen.emit")
        if codegen is None:
            print("\n(--code: codegen is not available in this build)")
        else:
            print("\n" + codegen.emit_for_plan_file(args.plan, args.model))
    return 0


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise


# ---- wiring ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="meshplan", description="A declarative compiler for MoE parallelism plans: trace a model, plan "
                                            "its parallelism (ILP), schedule, generate code and run it.")
    p.add_argument("--version", action="version", version=f"meshplan {version()}", help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too")
    p.add_argument("--verbose", action="store_true",
                   help="also name the config fields left to their defaults (meshplan --verbose trace tiny)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("trace", help="trace a model config into the IR and print it as a table",
                       description="Trace a model config into the IR and print every op's shapes, FLOPs and "
                                   "parameters.")
    t.add_argument("config", help="a model config: a NAME (tiny, internal-352b, ...; see meshplan/configs/models/ "
                                  "and $XDG_CONFIG_HOME/meshplan/models/) a YAML path, "
                                  "or a Hugging Face config.json")
    t.add_argument("--batch", type=positive_int, default=1, help="batch size B to evaluate FLOPs at (default 1)")
    t.add_argument("--seq", type=positive_int, default=None,
                   help="sequence length S (default and maximum: the model's max_seq_len)")
    t.add_argument("--head", choices=["lm", "value"], default="lm", help="LM head or value head (critic)")
    t.set_defaults(func=cmd_trace)

    s = sub.add_parser("show", help="print a plan YAML readably (identical layers collapsed)",
                       description="Print a plan YAML readably, identical layers collapsed; --model validates it.")
    s.add_argument("plan", help="a plan YAML file")
    s.add_argument("--model", help="also validate the plan against this model config (a NAME or a YAML path)")
    s.add_argument("--code", action="store_true", help="also print the module codegen emits for this plan")
    s.set_defaults(func=cmd_show)

    # Stages register their own subcommands; a stage missing from this build simply has none.
    for module, adder in [("meshplan.demo", "add_parsers"), ("meshplan.planner.cli", "add_parsers"),
                          ("meshplan.measure.cli", "add_parsers"),
                          ("meshplan.runtime.launch", "add_parsers"), ("meshplan.codegen.cli", "add_parsers"),
                          ("meshplan.rl.cli", "add_parsers")]:
        m = _optional(module)
        if m is not None and hasattr(m, adder):
            getattr(m, adder)(sub)
    return p


def version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """`meshplan ...`: returns the exit code (2 and one `meshplan: error:` line for a user's mistake); argparse's
    own errors and --help/--version exit through SystemExit."""
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
