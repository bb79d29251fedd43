"""Real processes: gloo over torch.distributed, worlds of 2 and 4, and the two launch paths end to end.

A world costs seconds to start, so each spawn runs a batch of plans (rt_harness.matrix_worker), every rank
comparing its loss and full gradients with the single-device model it computes itself.
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from rt_harness import matrix_worker, tiny_config, uniform_plan

from meshplan.ir import Mesh, trace
from meshplan.models import build_model
from meshplan.runtime.launch import cli_run, spawn

ATTENTION = ("sp", "tp")
FFN = ("ep", "tp", "ag_scatter")


def _jobs(cfg, meshes: dict[str, Mesh], batch=4, seq=8):
    graph = trace(build_model(cfg))
    jobs = []
    for mesh_name, mesh in meshes.items():
        for att in ATTENTION:
            for moe in FFN:
                plan = uniform_plan(graph, mesh, {"attention": att, "moe": moe})
                jobs.append({"label": f"{mesh_name} {att}/{moe}", "plan": plan.to_yaml(), "batch": batch,
                             "seq": seq, "config": cfg.to_dict()})
    dp = uniform_plan(graph, Mesh.of(dp=mesh.size), {}, axis=None)
    jobs.append({"label": f"dp{mesh.size}", "plan": dp.to_yaml(), "batch": batch, "seq": seq,
                 "config": cfg.to_dict()})
    return jobs


def _run(world, jobs, tmp_path):
    spawn(world, matrix_worker, jobs, str(tmp_path), timeout_s=60)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert set(reports[0]) == {j["label"] for j in jobs}
    bad = {f"rank {r} {label}": rep["bad"] for r, report in enumerate(reports)
           for label, rep in report.items() if rep["bad"]}
    assert bad == {}
    return reports


def test_world_of_2(tmp_path):
    cfg = tiny_config(n_shared_experts=1)
    _run(2, _jobs(cfg, {"mp2": Mesh.of(mp=2)}), tmp_path)


def test_world_of_4(tmp_path):
    """Data parallel x model parallel (dp=2, mp=2), and a 4-way model axis (more KV-head copies than heads)."""
    cfg = tiny_config(n_dense_layers=1, n_layers=2)
    _run(4, _jobs(cfg, {"dp2xmp2": Mesh.of(dp=2, mp=2), "mp4": Mesh.of(mp=4)}), tmp_path)


def _plan_file(tmp_path, mesh, strategies, name="plan.yaml"):
    path = tmp_path / name
    uniform_plan(trace(build_model(tiny_config())), mesh, strategies).to_yaml(path)
    return path


def _model_file(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(tiny_config().to_dict()))
    return path


def _steps(stdout: str) -> list[float]:
    return [float(line.split("loss")[1].split()[0]) for line in stdout.splitlines() if line.startswith("step ")]


def _one_device_losses(steps: int, batch: int, seq: int, seed: int, lr: float) -> list[float]:
    """run_plan.train's loop written out on one device: the same model seed, the same global batches (the
    synthetic token stream of seed + 1, every rank's shard together), AdamW, cross-entropy over all tokens, the
    gradient norm clipped to 1.0 (`meshplan run`'s default --clip-grad)."""
    from meshplan.runtime.data import ShardedLoader, TokenStream

    cfg = tiny_config()
    model = build_model(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = ShardedLoader(TokenStream.synthetic(cfg.vocab_size, seed + 1), batch, seq, (), [], seed=seed)
    losses = []
    for step in range(steps):
        tokens, targets = loader.global_batch(step)
        loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), targets.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def test_torchrun_end_to_end(tmp_path, subprocess_env):
    """torchrun's 2 ranks (sp attention, ep MoE) train like one device: 3 losses equal to 1e-5, and the printed
    ones agree with the metrics file. Mutation tried: the training loop skipping pm.reduce_gradients(): the step-2
    and step-3 losses differ (fails)."""
    plan = _plan_file(tmp_path, Mesh.of(mp=2), {"attention": "sp", "moe": "ep"})
    metrics = tmp_path / "metrics.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "meshplan.runtime.launch", "--model", str(_model_file(tmp_path)), "--plan", str(plan),
           "--steps", "3", "--batch", "2", "--seq", "8", "--seed", "3", "--lr", "0.01", "--metrics", str(metrics)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, timeout=150, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert losses == pytest.approx(_one_device_losses(3, 2, 8, seed=3, lr=0.01), rel=1e-5, abs=1e-6)
    assert _steps(out.stdout) == pytest.approx(losses, abs=1e-6)
    assert "tokens/s" in out.stdout


def test_meshplan_run_spawns_its_ranks(tmp_path):
    """`meshplan run` (cli_run) without torchrun starts --nproc processes itself; its losses equal a 1-rank run's."""
    two = _plan_file(tmp_path, Mesh.of(mp=2), {"attention": "tp", "moe": "ag_scatter"}, "two.yaml")
    one = _plan_file(tmp_path, Mesh.of(mp=1), {}, "one.yaml")
    args = ["--model", str(_model_file(tmp_path)), "--steps", "2", "--batch", "2", "--seq", "8"]
    runs = {}
    for name, plan, nproc in (("two", two, "2"), ("one", one, "1")):
        metrics = tmp_path / f"{name}.jsonl"
        assert cli_run(["--nproc", nproc, "--plan", str(plan), "--metrics", str(metrics), *args]) == 0
        runs[name] = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in runs["two"]] == [1, 2]
    assert all(m["tokens_per_s"] > 0 and m["comm_bytes_per_rank"] > 0 for m in runs["two"])
    assert [m["loss"] for m in runs["two"]] == pytest.approx([m["loss"] for m in runs["one"]], rel=1e-5)


def test_meshplan_run_rejects_wrong_nproc(tmp_path, capfd):
    plan = _plan_file(tmp_path, Mesh.of(mp=2), {})
    assert cli_run(["--nproc", "3", "--plan", str(plan), "--model", str(_model_file(tmp_path)), "--steps", "1"]) == 2
    err = capfd.readouterr().err
    assert "needs 2 ranks" in err and "--nproc is 3" in err
