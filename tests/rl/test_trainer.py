"""The trainer end to end on tiny settings: bit-identical resume, checkpoints, metrics, value-pretraining
targets, the CLI, and data-parallel processes through the runtime."""
import json

import pytest
import torch
import yaml

from meshplan.rl import checkpoint as ckpt_io
from meshplan.rl.cli import main
from meshplan.rl.config import config_from_dict
from meshplan.rl.metrics import TIMING_KEYS, read_metrics
from meshplan.rl.trainer import Trainer, train


def tiny(out, preset="vapo", **train_over):
    d = {"name": "t", "seed": 0, "model": "tiny",
         "task": {"max_digits": 2, "eval_size": 8},
         "warmup": {"steps": 3, "batch_size": 8},
         "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4},
         "algo": {"preset": preset, **({"value_pretrain_steps": 2} if preset in ("vapo", "ppo") else {})},
         "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "out": str(out), "threads": 1,
                   "plot": False, **train_over}}
    return d


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.parametrize("preset", ["vapo", "dapo"])
def test_resume_is_bit_identical(tmp_path, preset):
    straight = train(config_from_dict(tiny(tmp_path / "a", preset)))
    train(config_from_dict(tiny(tmp_path / "b", preset, steps=2)))
    resumed = train(config_from_dict(tiny(tmp_path / "b", preset)), resume=True)
    assert _untimed(straight) == _untimed(resumed)
    a, b = ckpt_io.load(tmp_path / "a" / "checkpoint.pt"), ckpt_io.load(tmp_path / "b" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4 and a["samples"] == b["samples"]
    for model in ("actor", "critic"):
        if a[model] is None:
            continue
        for k in a[model]:
            assert torch.equal(a[model][k], b[model][k]), f"{model}.{k} differs after resume"
    assert a["sampler"] == b["sampler"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_checkpoint_metrics_and_plot(tmp_path):
    records = train(config_from_dict(tiny(tmp_path, "ppo", steps=2, plot=True)))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoint.pt", "curves.png", "metrics.jsonl"]  # no temporary checkpoint left behind
    state = ckpt_io.load(tmp_path / "checkpoint.pt")
    assert {"actor", "critic", "actor_opt", "critic_opt", "rng", "sampler", "step", "samples"} <= set(state)
    assert set(state["rng"][0]) == {"torch", "python", "numpy"} and state["actor_opt"][0]["state"]
    rl = [r for r in records if r["phase"] == "rl" and r["step"] > 0]
    for key in ("reward", "response_len", "value_loss", "clip_frac", "entropy", "tokens_per_s", "eval_accuracy"):
        assert key in rl[-1], key
    assert [r["step"] for r in rl] == [1, 2] and rl[-1]["samples"] == 2 * 8
    assert records[0]["phase"] == "warmup" and "eval_accuracy" in records[1]


def test_value_pretraining_fits_monte_carlo_returns(tmp_path, monkeypatch):
    cfg = config_from_dict(tiny(tmp_path, "vapo", steps=0))
    seen = []
    original = Trainer._update_critic

    def spy(self, ro, returns, old_values):
        seen.append((ro, returns))
        return original(self, ro, returns, old_values)

    monkeypatch.setattr(Trainer, "_update_critic", spy)
    trainer = Trainer(cfg)
    policy_before = trainer.actor.full_state_dict()
    trainer.run()
    assert len(seen) == 2  # value_pretrain_steps, and no RL step
    for ro, returns in seen:
        # gamma = 1, reward on the final token, lambda = 1: every response token's target is the episode's reward
        rewards = returns.max(-1).values  # rewards are 0/1 here, and returns are constant along each response
        torch.testing.assert_close(returns, rewards[:, None] * ro.mask)
    after = trainer.actor.full_state_dict()  # the policy is fixed during value pretraining
    assert all(torch.equal(policy_before[k], after[k]) for k in after)


def test_cli_train(tmp_path, capsys):
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path / "ignored", "grpo")))
    assert main(["train", str(path), "--steps", "1", "--out", str(tmp_path / "run")]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["step"] == 1 and "held-out accuracy" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"algo": {"eps_hgh": 1}}))
    assert main(["train", str(bad)]) == 2
    assert "rl.algo.eps_hgh: unknown field" in capsys.readouterr().err


def test_two_data_parallel_processes(tmp_path):
    records = train(config_from_dict(tiny(tmp_path, "vapo", steps=2, nproc=2)))
    rl = [r for r in records if r["phase"] == "rl" and r["step"] > 0]
    assert [r["generated"] for r in rl] == [8, 8]  # each rank sampled one prompt x 4, gathered to 8
    state = ckpt_io.load(tmp_path / "checkpoint.pt")
    assert state["world"] == 2 and len(state["actor_opt"]) == 2 and len(state["rng"]) == 2
