"""RL configs: the shipped YAMLs load, presets match the table, bad fields raise one error naming them."""
from pathlib import Path

import pytest
import torch

from meshplan.rl.algorithms import PRESETS, mixed_groups, overlong_penalty, resolved_overlong_buffer
from meshplan.rl.config import RLConfigError, config_from_dict, load_rl_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "rl"


@pytest.mark.parametrize("name", ["vapo", "ppo", "grpo", "dapo"])
def test_shipped_configs_load(name):
    cfg = load_rl_config(CONFIGS / f"{name}-tiny.yaml")
    assert cfg.algo.name == name and cfg.name == f"{name}-tiny"


def test_presets_are_the_papers_settings():
    v, p, g, d = (PRESETS[k]() for k in ("vapo", "ppo", "grpo", "dapo"))
    assert (v.critic, v.value_pretrain_steps, v.decoupled_gae, v.lambda_critic, v.length_adaptive_gae, v.alpha,
            v.token_level_loss, v.eps_low, v.eps_high, v.pos_lm_coef) == (True, 50, True, 1.0, True, 0.05, True,
                                                                           0.2, 0.28, 0.1)
    assert (p.critic, p.value_pretrain_steps, p.lambda_policy, p.lambda_critic, p.decoupled_gae, p.token_level_loss,
            p.eps_high, p.pos_lm_coef) == (True, 0, 0.95, 0.95, False, False, 0.2, 0.0)
    assert (g.critic, g.token_level_loss, g.eps_high, g.dynamic_sampling) == (False, False, 0.2, False)
    assert (d.critic, d.token_level_loss, d.eps_high, d.dynamic_sampling) == (False, True, 0.28, True)
    assert resolved_overlong_buffer(d, 40) == 8 and resolved_overlong_buffer(v, 40) == 0


def test_overrides_switch_one_component():
    cfg = config_from_dict({"algo": {"preset": "vapo", "pos_lm_coef": 0.0}})
    assert cfg.algo.pos_lm_coef == 0.0 and cfg.algo.eps_high == 0.28 and cfg.algo.critic


@pytest.mark.parametrize("d, field", [
    ({"algo": {"eps_hgh": 0.3}}, "rl.algo.eps_hgh: unknown field"),
    ({"rollout": {"samples": 4}}, "rl.rollout.samples: unknown field"),
    ({"bogus": 1}, "rl.bogus: unknown field"),
    ({"optim": {"actor_lr": "fast"}}, "rl.optim.actor_lr: expected a number"),
    ({"algo": {"critic": "yes"}}, "rl.algo.critic: expected true or false"),
    ({"train": {"steps": 1.5}}, "rl.train.steps: expected an integer"),
    ({"algo": {"preset": "trpo"}}, "rl.algo.preset: 'trpo' is not one of"),
    ({"algo": {"eps_low": 1.5}}, "rl.algo.eps_low: must be in (0, 1)"),
    ({"algo": {"lambda_policy": 2}}, "rl.algo.lambda_policy: must be in [0, 1]"),
    ({"task": {"ops": "*"}}, "rl.task.ops"),
    ({"train": {"nproc": 3}}, "rl.rollout.prompts_per_step: 16 prompts do not split evenly over nproc=3"),
    ({"algo": {"preset": "grpo"}, "rollout": {"samples_per_prompt": 1}}, "rl.algo.critic: group-normalised"),
])
def test_invalid_fields_are_named(d, field):
    with pytest.raises(RLConfigError) as e:
        config_from_dict(d)
    assert field in str(e.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(RLConfigError, match="no such file|No such file"):
        load_rl_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: [1, 2\n")
    with pytest.raises(RLConfigError, match="not valid YAML"):
        load_rl_config(bad)


def test_dapo_overlong_shaping_and_dynamic_sampling_filter():
    # max_len 40, buffer 8: 0 up to 32, then linearly to -1 at 40
    pen = overlong_penalty(torch.tensor([10, 32, 36, 40]), 40, 8)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0]))
    assert overlong_penalty(torch.tensor([40]), 40, 0).tolist() == [0.0]
    correct = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)  # groups of 3: mixed, all wrong, all right
    assert mixed_groups(correct, 3).tolist() == [True, False, False]


ABLATED = {"value-pretrain": {"algo.value_pretrain_steps"}, "decoupled-gae": {"algo.decoupled_gae"},
           "length-adaptive": {"algo.length_adaptive_gae"}, "token-loss": {"algo.token_level_loss"},
           "clip-higher": {"algo.eps_high"}, "pos-lm": {"algo.pos_lm_coef"},
           "group-sampling": {"rollout.prompts_per_step", "rollout.samples_per_prompt"}}


def _flat(cfg) -> dict:
    d = cfg.to_dict()
    return {f"{k}.{kk}": vv for k, v in d.items() if isinstance(v, dict) for kk, vv in v.items()
            if (k, kk) != ("train", "out")}


def test_chain_configs_share_one_warm_up_and_ablations_drop_one_component():
    """rl_compare/rl_ablation start every run from one warm-up: model, task, warm-up sections must be equal."""
    base = load_rl_config(CONFIGS / "vapo-chain.yaml")
    for algo in ("dapo", "grpo", "ppo"):
        c = load_rl_config(CONFIGS / f"{algo}-chain.yaml")
        assert c.algo.name == algo and (c.model, c.task, c.warmup, c.rollout) == (base.model, base.task,
                                                                                   base.warmup, base.rollout)
    for comp, keys in ABLATED.items():
        c = load_rl_config(CONFIGS / f"vapo-chain-no-{comp}.yaml")
        diff = {k for k, v in _flat(c).items() if _flat(base)[k] != v}
        assert diff == keys, comp
        assert c.rollout.prompts_per_step * c.rollout.samples_per_prompt == 64  # equal samples per step
