"""The emitted overlap module: valid Python, in the Schedule's order, inspectable from the CLI."""
import ast
import re

import pytest

from meshplan.cli import main
from meshplan.codegen.durations import ROOFLINES, durations_for
from meshplan.codegen.emit import CHUNK_KINDS, emit_for_plan_file, emit_module
from meshplan.codegen.scheduler import list_schedule
from meshplan.codegen.task_graph import build_task_graph
from meshplan.ir import Mesh, Plan, trace
from meshplan.models import build_model, load_config

TAG = re.compile(r"^\s*(\w+) = .*  # (wait )?(fwd:\{op\}/\S+)$")


@pytest.fixture(scope="module")
def tiny():
    return trace(build_model(load_config("tiny")))


def functions(source: str) -> dict[str, list[str]]:
    """function name -> its lines; and the op -> function table, parsed from the module."""
    out, name = {}, None
    for line in source.splitlines():
        if line.startswith("def "):
            name = line[4:line.index("(")]
            out[name] = []
        elif name and line.startswith("    "):
            out[name].append(line)
        elif line.strip():
            name = None
    return out


def check_order(lines: list[str], op: str, sch) -> None:
    """Each comm task issued in the comm stream's order, each compute task in the compute stream's order, each
    wait after its issue and before the first compute task that depends on it, and every task exactly once."""
    issued, waited, computed = [], {}, []
    by_id = {s.id: s for s in sch.slots}
    for i, line in enumerate(lines):
        m = TAG.match(line)
        if not m:
            continue
        tid = m.group(3).replace("{op}", op)
        if m.group(2):
            assert tid in issued, f"wait for {tid} before it was issued"
            waited[tid] = i
        elif by_id[tid].task.stream == "comm":
            issued.append(tid)
        else:
            for dep in by_id[tid].task.deps:
                if by_id[dep].task.stream == "comm" and by_id[dep].task.op == op:
                    assert dep in waited, f"{tid} uses {dep} without waiting for it"
            computed.append(tid)
    program = sch.program()
    mine = lambda stream: [s.id for s, _ in program[stream] if s.task.op == op and s.id.startswith("fwd:")]  # noqa
    assert issued == mine("comm")
    assert computed == mine("compute")
    assert sorted(waited) == sorted(issued)  # every collective waited on, once (a dict keeps one per id)


@pytest.mark.parametrize("chunks", [1, 2, 4])
@pytest.mark.parametrize("cluster", ["local", "cpu-gloo", "h800"])
def test_emitted_order_matches_schedule(tiny, chunks, cluster):
    plan = Plan.build(tiny, Mesh.of(dp=2, mp=2), {"attention": "sp", "moe": "ep"})
    batch, seq = 8, 64
    durations = cluster if cluster == "local" else ROOFLINES[cluster]
    source = emit_module(tiny, plan, batch, seq, chunks, durations)
    ast.parse(source)
    tg = build_task_graph(tiny, plan, batch, seq, chunks, CHUNK_KINDS)
    sch = list_schedule(tg, durations_for(cluster, plan.mesh) if cluster == "local" else durations)
    table = dict(re.findall(r"^    '([\w.]+)': (\w+),$", source, re.M))
    assert set(table) == {"layers.0.attention", "layers.1.attention", "layers.0.feed_forward",
                          "layers.1.feed_forward"}
    bodies = functions(source)
    for op, fn in table.items():
        check_order(bodies[fn], op, sch)


def test_overlap_pattern_on_a_comm_light_cost_model(tiny):
    """With cheap collectives (h800 roofline) chunk 1's routing is issued before chunk 0's dispatch is waited on:
    the MegaScale-MoE pattern, not a straight line per chunk."""
    plan = Plan.build(tiny, Mesh.of(mp=2), {"attention": "sp", "moe": "ep"})
    source = emit_module(tiny, plan, 4, 128, 2, ROOFLINES["h800"])
    body = "\n".join(functions(source)["layers_0_feed_forward"])
    assert body.index("dispatch0 = start_rows") < body.index("route1 = ep_route") < body.index("dispatch0.wait()")


def test_ops_without_inner_collectives_are_left_to_the_executor(tiny):
    plan = Plan.build(tiny, Mesh.of(mp=2), {"attention": "tp", "moe": "ep"})
    source = emit_module(tiny, plan, 4, 32, 2, "cpu-gloo")
    assert "layers.0.attention (tp)" in source
    assert "'layers.0.attention'" not in source and "'layers.0.feed_forward'" in source


def test_compressed_collectives_stay_on_the_executor(tiny):
    plan = Plan.build(tiny, Mesh.of(mp=2), {"attention": "sp", "moe": "ep"}, precision={"dispatch": "fp8"})
    source = emit_module(tiny, plan, 4, 32, 2, "cpu-gloo")
    assert "layers.0.feed_forward (ep, compressed dispatch)" in source
    assert "'layers.0.feed_forward'" not in source and "'layers.0.attention'" in source


def test_show_code_prints_the_module(tmp_path, tiny, capsys):
    path = tmp_path / "plan.yaml"
    Plan.build(tiny, Mesh.of(mp=2), {"attention": "sp", "moe": "ep"}).to_yaml(path)
    assert main(["show", str(path), "--model", "tiny", "--code"]) == 0
    out = capsys.readouterr().out
    assert "def layers_0_attention(ctx, x):" in out and "start_rows(" in out and "OPS = {" in out
    assert emit_for_plan_file(path, None) in out  # the plan's own model when none is given


def test_schedule_code_flag(tmp_path, tiny, capsys):
    path = tmp_path / "plan.yaml"
    Plan.build(tiny, Mesh.of(mp=2), {"attention": "sp", "moe": "ep"}).to_yaml(path)
    assert main(["schedule", str(path), "--model", "tiny", "--cluster", "cpu-gloo", "--batch", "4", "--seq", "32",
                 "--code"]) == 0
    out = capsys.readouterr().out
    assert "BATCH, SEQ, CHUNKS = 4, 32, 2" in out and "def layers_0_feed_forward(ctx, x):" in out
