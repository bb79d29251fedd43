"""The commands no other test ran, each once on the tiny model, their outputs checked: trace --head value,
simulate --json, calibrate, train --resume, demo (with --steps to keep it short)."""
import json
import re

import pytest
import yaml

from meshplan.cli import main
from meshplan.ir import Plan, trace
from meshplan.models import build_model, load_config
from meshplan.planner import load_cluster
from meshplan.rl.metrics import TIMING_KEYS, read_metrics


def _number(out: str, label: str) -> int:
    return int(re.search(rf"{label}:\s+([\d,]+)", out).group(1).replace(",", ""))


def test_trace_value_head(capsys):
    """The value head replaces the [D, V] LM head with a [D, 1] one (tiny: D = 64, V = 256) and squeezes its
    output to [B, S]. Mutation tried: --head ignored by cmd_trace (the LM model traced): fails."""
    assert main(["trace", "tiny"]) == 0
    lm = capsys.readouterr().out
    assert main(["trace", "tiny", "--head", "value"]) == 0
    value = capsys.readouterr().out
    assert _number(lm, "total parameters") - _number(value, "total parameters") == 64 * 256 - 64
    assert _number(lm, "activated parameters/token") - _number(value, "activated parameters/token") == 64 * 255
    assert "float32[B, S, 1]" in value and re.search(r"return\s+output\s+float32\[B, S\]\s", value)


def test_simulate_json(tmp_path, capsys):
    """--json rows agree with the printed table and with tokens/s = global batch x seq / step time."""
    path = tmp_path / "rows.json"
    assert main(["simulate", "tiny", "--gpus", "8", "--global-batch", "32", "--cluster", "h800",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(path.read_text())
    assert rows[0]["plan"] == "planner" and {"megatron", "ep_dp"} <= {r["plan"] for r in rows}
    assert "global batch 32 x 128 tokens" in out
    fitting = [r for r in rows if r["fits"]]  # the fixed-depth MegaScale-style baseline does not fit 8 GPUs
    assert {"planner", "megatron", "ep_dp"} <= {r["plan"] for r in fitting}
    for r in fitting:
        assert r["tokens_per_s"] == pytest.approx(32 * 128 / r["step_time_s"], rel=1e-12)
        assert r["pp"] * r["dp"] * r["mp"] == 8
        assert f"{r['step_time_s']:.3f}" in out and f"{r['tokens_per_s']:,.0f}" in out


def test_calibrate_writes_a_loadable_cluster(tmp_path, capsys):
    """A tiny budget (2 ranks, 2 sizes, 1 repetition) written to a tmp path, never configs/clusters/local.yaml."""
    out_path = tmp_path / "local.yaml"
    assert main(["calibrate", "--out", str(out_path), "--ranks", "2", "--sizes", "4096,65536", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    cluster = load_cluster(out_path)
    assert set(cluster.intra_node.collectives) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"}
    assert cluster.peak_flops > 0 and cluster.hbm_bandwidth > 0
    assert f"matmul peak {cluster.peak_flops / 1e9:.1f} GFLOP/s" in out and f"wrote {out_path}" in out
    for name in cluster.intra_node.collectives:
        assert re.search(rf"^{name}\s+[\d.]+\s+[\d.]+$", out, re.MULTILINE), name


def test_train_resume(tmp_path, capsys):
    """`meshplan train --steps 1` then `--steps 2 --resume` logs what one `--steps 2` run logs (no second
    warm-up, no second step-0 eval). Mutation tried: cmd_train dropping --resume (train(cfg)): fails."""
    cfg = {"name": "t", "seed": 0, "model": "tiny", "task": {"max_digits": 1, "eval_size": 8},
           "warmup": {"steps": 20, "batch_size": 16}, "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2},
           "algo": {"preset": "grpo"},
           "train": {"steps": 2, "eval_every": 1, "checkpoint_every": 1, "threads": 1, "plot": False}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "straight")]) == 0
    assert main(["train", str(path), "--steps", "1", "--out", str(tmp_path / "resumed")]) == 0
    first = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert main(["train", str(path), "--steps", "2", "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    assert "at step 2; metrics in" in capsys.readouterr().out
    # the records of step 1 are kept as written, wall-clock fields included (a fresh run would rewrite them)
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text().startswith(first)

    def untimed(d):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(d / "metrics.jsonl")]

    straight, resumed = untimed(tmp_path / "straight"), untimed(tmp_path / "resumed")
    assert [r["step"] for r in resumed if r["phase"] == "rl"] == [0, 1, 2]
    assert straight == resumed


def test_demo_reduced_steps(tmp_path, monkeypatch, capsys):
    """`meshplan demo --steps 2`: 4 gloo ranks train like one device (every printed step's two losses equal),
    and it writes a plan that validates for tiny and a PNG Gantt chart. Mutation tried: the demo's ranks
    skipping cm.reduce_gradients(): the step-2 losses differ and it prints MISMATCH (fails)."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "== 3. train 2 steps on 4 processes (gloo) vs one device ==" in out and "(OK)" in out
    steps = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.e+-]+$", out, re.MULTILINE)
    assert [s[0] for s in steps] == ["1", "2"] and all(abs(float(a) - float(b)) < 1e-4 for _, a, b in steps)
    plan = Plan.from_yaml(tmp_path / "out" / "demo_plan.yaml")
    plan.validate(trace(build_model(load_config("tiny"))), batch=8, seq=64)
    assert plan.mesh.size == 4
    assert (tmp_path / "out" / "demo_schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^planner\s+pp=\d+ dp=\d+ mp=\d+", out, re.MULTILINE)
