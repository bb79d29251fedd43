"""`meshplan plan` / `simulate` as a user runs them (in-process through meshplan.cli.main)."""
from meshplan.cli import main
from meshplan.ir import Plan, trace
from meshplan.models import build_model, load_config


def test_plan_writes_a_valid_plan_and_explains(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "tiny", "--gpus", "4", "--global-batch", "8", "--out", str(out),
                 "--explain", "layers.0.feed_forward"]) == 0
    text = capsys.readouterr().out
    for needle in ("mesh pp=", "tokens/s", "op (template)", "layers.*.feed_forward", "[ep]", "FLOPs/GPU (fwd)",
                   "dispatch: all_to_all", "activations/mb", "wrote"):
        assert needle in text, needle
    plan = Plan.from_yaml(out)
    g = trace(build_model(load_config("tiny"), device="meta"))
    plan.validate(g)


def test_simulate_prints_planner_and_baselines(capsys):
    assert main(["simulate", "tiny", "--gpus", "8", "--global-batch", "32"]) == 0
    text = capsys.readouterr().out
    assert "planner" in text and "megatron" in text and "ep_dp" in text and "MFU" in text


def test_errors_are_one_line(capsys):
    assert main(["plan", "internal-352b", "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert "per-GPU memory" in err and "use >=" in err and err.count("\n") == 1
    assert main(["plan", "tiny", "--gpus", "4", "--cluster", "nope"]) == 2
    assert "cluster 'nope'" in capsys.readouterr().err
    assert main(["plan", "tiny", "--gpus", "4", "--explain", "layers.0.nothing"]) == 2
