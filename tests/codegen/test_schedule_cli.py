"""`meshplan schedule` as a user runs it: table, comparison, PNG and YAML outputs, one-line errors."""
from meshplan.cli import main
from meshplan.codegen.schedule import Schedule
from meshplan.ir import Mesh, Plan, trace
from meshplan.models import build_model, load_config


def write_plan(tmp_path, **strategies):
    g = trace(build_model(load_config("tiny")))
    path = tmp_path / "plan.yaml"
    Plan.build(g, Mesh.of(dp=2, mp=2), strategies).to_yaml(path)
    return path


def test_schedule_prints_table_comparison_and_writes_png_and_yaml(tmp_path, capsys):
    plan = write_plan(tmp_path, attention="sp", moe="ep")
    png, out = tmp_path / "gantt.png", tmp_path / "schedule.yaml"
    assert main(["schedule", str(plan), "--model", "tiny", "--cluster", "cpu-gloo", "--png", str(png),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fwd:layers.0.feed_forward/dispatch#1" in text and "bwd:layers.1.attention/grad" in text
    for label in ("overlap, 2 chunks", "overlap, 1 chunk", "sequential, 1 chunk", "critical-path lower bound"):
        assert label in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    sch = Schedule.from_yaml(out).validate()
    assert sch.meta["chunks"] == 2 and sch.meta["mesh"] == {"dp": 2, "mp": 2}


def test_schedule_errors_are_one_line(tmp_path, capsys):
    plan = write_plan(tmp_path, attention="tp")
    assert main(["schedule", str(plan), "--model", "tiny", "--chunks", "3"]) == 2
    assert "chunks: 3 chunks do not divide the per-rank batch 4" in capsys.readouterr().err
    assert main(["schedule", str(plan), "--model", "tiny", "--cluster", "nope"]) == 2
    assert "--cluster: cluster 'nope'" in capsys.readouterr().err
    assert main(["schedule", str(plan), "--model", "tiny", "--chunk-kinds", "moe,mlp"]) == 2
    assert "unknown op kind 'mlp'" in capsys.readouterr().err
