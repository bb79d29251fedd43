"""VAPO and its baselines as configurations of one code path.

Every VAPO component is one flag of AlgoConfig, so each can be switched off alone (ablations), and PPO, GRPO and
DAPO are presets of the same flags (docs/reference.md, VAPO section):

| flag                 | vapo        | ppo         | grpo        | dapo        |
|----------------------|-------------|-------------|-------------|-------------|
| critic               | yes         | yes         | no (group)  | no (group)  |
| value_pretrain_steps | 50          | 0           | -           | -           |
| decoupled_gae        | 1.0 / 0.95  | 0.95 / 0.95 | -           | -           |
| length_adaptive_gae  | alpha 0.05  | no          | -           | -           |
| token_level_loss     | yes         | no          | no          | yes         |
| eps_low / eps_high   | 0.2 / 0.28  | 0.2 / 0.2   | 0.2 / 0.2   | 0.2 / 0.28  |
| pos_lm_coef          | 0.1         | 0           | 0           | 0           |
| dynamic_sampling     | no          | no          | no          | yes         |
| overlong_buffer      | 0           | 0           | 0           | max_new/5   |
Group sampling (K samples per prompt) is rollout.samples_per_prompt, shared by all (K = 1 switches it off).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .advantages import final_token_rewards, gae, group_normalized_advantages, length_adaptive_lambda, whiten


@dataclass
class AlgoConfig:
    name: str = "vapo"
    critic: bool = True  # value model + GAE; False: group-normalised advantages (GRPO/DAPO), no critic
    value_pretrain_steps: int = 50  # critic-only steps on the initial policy's rollouts, MC-return targets
    decoupled_gae: bool = True  # critic targets with lambda_critic; False: both use lambda_policy
    lambda_critic: float = 1.0
    lambda_policy: float = 0.95  # used when length_adaptive_gae is off
    length_adaptive_gae: bool = True  # lambda_policy = 1 - 1/(alpha l) per sequence
    alpha: float = 0.05
    # normalise GAE advantages over the batch's tokens (verl's PPO default). Off by default: with 0/1 rewards the
    # advantages are already O(1), and when a batch has no correct sample whitening blows critic noise up to unit
    # variance and the policy follows it
    whiten_advantages: bool = False
    group_std: bool = True  # group advantages divided by the group's std (GRPO/DAPO)
    token_level_loss: bool = True
    eps_low: float = 0.2
    eps_high: float = 0.28
    pos_lm_coef: float = 0.1  # positive-example LM loss weight mu (0: off)
    dynamic_sampling: bool = False  # keep only groups with mixed outcomes; resample to refill (DAPO)
    max_sampling_rounds: int = 3  # cap on dynamic sampling's generation rounds per step
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last this-many tokens (0: off)
    overlong_penalty: float = 1.0  # the punishment at (and past) max_new_tokens
    value_clip: float = 0.0  # PPO value clipping range (0: off)
    gamma: float = 1.0


def _vapo() -> AlgoConfig:
    return AlgoConfig()


def _ppo() -> AlgoConfig:
    return AlgoConfig(name="ppo", value_pretrain_steps=0, decoupled_gae=False, lambda_critic=0.95,
                      lambda_policy=0.95, length_adaptive_gae=False, token_level_loss=False, eps_high=0.2,
                      pos_lm_coef=0.0)


def _grpo() -> AlgoConfig:
    return AlgoConfig(name="grpo", critic=False, value_pretrain_steps=0, length_adaptive_gae=False,
                      token_level_loss=False, eps_high=0.2, pos_lm_coef=0.0)


def _dapo() -> AlgoConfig:
    # overlong_buffer < 0 means "a fifth of max_new_tokens" (DAPO: 4096 of 20480), resolved once the length is known
    return AlgoConfig(name="dapo", critic=False, value_pretrain_steps=0, length_adaptive_gae=False,
                      token_level_loss=True, eps_high=0.28, pos_lm_coef=0.0, dynamic_sampling=True,
                      overlong_buffer=-1)


PRESETS = {"vapo": _vapo, "ppo": _ppo, "grpo": _grpo, "dapo": _dapo}


def validate_algo(a: AlgoConfig, group_size: int) -> str | None:
    """The first invalid field as 'field: why', or None."""
    if a.value_pretrain_steps < 0:
        return "value_pretrain_steps: must be >= 0"
    for f in ("lambda_critic", "lambda_policy", "gamma"):
        if not 0.0 <= getattr(a, f) <= 1.0:
            return f"{f}: must be in [0, 1]"
    if a.alpha <= 0:
        return "alpha: must be > 0"
    if not 0 < a.eps_low < 1:
        return "eps_low: must be in (0, 1)"
    if a.eps_high <= 0:
        return "eps_high: must be > 0"
    if a.pos_lm_coef < 0:
        return "pos_lm_coef: must be >= 0"
    if a.max_sampling_rounds < 1:
        return "max_sampling_rounds: must be >= 1"
    if a.overlong_buffer < -1:
        return "overlong_buffer: must be >= 0 (or -1: a fifth of max_new_tokens)"
    if a.value_clip < 0:
        return "value_clip: must be >= 0"
    if a.overlong_penalty < 0:
        return "overlong_penalty: must be >= 0"
    if a.max_sampling_rounds > 1000:
        return "max_sampling_rounds: must be <= 1000"
    if not a.critic and group_size < 2:
        return "critic: group-normalised advantages need rollout.samples_per_prompt >= 2"
    if a.dynamic_sampling and group_size < 2:
        return "dynamic_sampling: needs rollout.samples_per_prompt >= 2"
    return None


def resolved_overlong_buffer(a: AlgoConfig, max_new_tokens: int) -> int:
    return max(1, max_new_tokens // 5) if a.overlong_buffer < 0 else a.overlong_buffer


# ---- rewards --------------------------------------------------------------------------------------------------
def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then falling linearly to -penalty at max_len
    (a response cut off at max_len without EOS gets the full -penalty)."""
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)


def shaped_scores(a: AlgoConfig, rewards: torch.Tensor, response_lens: torch.Tensor, max_new_tokens: int):
    buf = resolved_overlong_buffer(a, max_new_tokens)
    return rewards + overlong_penalty(response_lens, max_new_tokens, buf, a.overlong_penalty)


def mixed_groups(correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: [G] bool, True for groups that are neither all right nor all wrong (whose
    group-normalised advantages are not all 0)."""
    c = correct.view(-1, group_size).float().mean(-1)
    return (c > 0) & (c < 1)


# ---- advantages -----------------------------------------------------------------------------------------------
def advantages_and_returns(a: AlgoConfig, scores: torch.Tensor, mask: torch.Tensor, response_lens: torch.Tensor,
                           group_size: int, values: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-token advantages for the policy and (critic only) return targets for the value model.
    scores [N]: each sequence's (shaped) reward, placed on its final token (gamma = 1, no KL)."""
    out: dict[str, torch.Tensor] = {}
    if not a.critic:
        adv = group_normalized_advantages(scores, group_size, scale=a.group_std)
        out["advantages"] = adv[:, None].expand(mask.shape) * mask
        return out
    rewards = final_token_rewards(scores, mask)
    lam_policy = length_adaptive_lambda(response_lens, a.alpha) if a.length_adaptive_gae \
        else torch.full((len(scores),), a.lambda_policy)
    adv, _ = gae(rewards, values, mask, lam_policy, a.gamma)
    lam_critic = a.lambda_critic if a.decoupled_gae else lam_policy
    _, returns = gae(rewards, values, mask, lam_critic, a.gamma)
    out["advantages"] = whiten(adv, mask) if a.whiten_advantages else adv
    out["returns"] = returns
    out["lambda_policy"] = lam_policy
    return out
