"""`meshplan demo` (what `make demo` runs): the main job on an embedded default, no arguments needed.

Each step uses only public entry points, so the demo doubles as a tour of the pipeline.
"""
from __future__ import annotations

from .cli import trace_table


def run_demo(args=None) -> int:
    from .ir import Mesh, Plan, trace
    from .models import build_model, load_config

    cfg = load_config("tiny")
    model = build_model(cfg)
    graph = trace(model)
    print("== 1. trace: the tiny MoE transformer as meshplan IR (B, S symbolic; evaluated at B=2, S=64) ==")
    print(trace_table(graph, 2, 64))
    print(graph.summary())

    plan = Plan.build(graph, Mesh.of(dp=2, mp=2), {"attention": "sp", "moe": "ep"}).validate(graph, batch=2, seq=64)
    print("\n== 2. a plan for 4 ranks (dp=2 x mp=2): Ulysses attention, expert-parallel MoE ==")
    from .cli import plan_rows
    from .table import format_table

    print(format_table(["op", "strategy", "axis", "input", "output", "precision"], plan_rows(plan), align="llllll"))
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("demo", help="run the embedded end-to-end demo (what `make demo` runs)")
    d.set_defaults(func=run_demo)
