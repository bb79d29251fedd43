"""Returns and advantages: GAE (decoupled, length-adaptive), Monte-Carlo returns, group-normalised advantages.

All per-token tensors are [N, T] over action positions with a bool mask; each row's valid actions form one
contiguous span (the response), and the value after the span's last action is 0 (the episode ends there).
gamma = 1 and the reward sits on the final response token only (docs/reference.md, VAPO).
"""
from __future__ import annotations

import torch


def final_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] sequence scores -> [N, T] rewards: the score on each row's last valid action, 0 elsewhere."""
    rewards = torch.zeros(mask.shape, dtype=torch.float32)
    has = mask.any(-1)
    last = mask.shape[1] - 1 - mask.flip(-1).float().argmax(-1)
    rewards[has, last[has]] = scores[has].float()
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, lam: float | torch.Tensor,
        gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016):
        delta_t = r_t + gamma V_{t+1} - V_t,    A_t = sum_l (gamma lam)^l delta_{t+l},    R_t = A_t + V_t
    with V = 0 past a row's last valid action. `lam` is a float or a per-row [N] tensor (length-adaptive GAE).
    Returns (advantages, returns), both 0 off the mask."""
    n, t_len = rewards.shape
    m = mask.float()
    lam = torch.as_tensor(lam, dtype=torch.float32).expand(n)
    values = values.float() * m
    adv = torch.zeros(n, t_len)
    running = torch.zeros(n)
    next_value = torch.zeros(n)
    next_valid = torch.zeros(n)
    for t in reversed(range(t_len)):
        delta = rewards[:, t] + gamma * next_value * next_valid - values[:, t]
        running = (delta + gamma * lam * next_valid * running) * m[:, t]
        adv[:, t] = running
        next_value, next_valid = values[:, t], m[:, t]
    return adv, (adv + values) * m


def monte_carlo_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go sum_{l>=0} gamma^l r_{t+l}: GAE with lam = 1, whose returns do not depend on the values.
    VAPO's value-pretraining targets (docs/reference.md: Monte-Carlo returns, GAE lambda = 1.0)."""
    return gae(rewards, torch.zeros_like(rewards), mask, 1.0, gamma)[1]


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float = 0.05) -> torch.Tensor:
    """VAPO's length-adaptive GAE: lambda_policy = 1 - 1/(alpha l) per sequence of response length l, so that
    the sum of the TD weights, 1/(1-lambda) = alpha l, grows with the length. Clamped to [0, 1]: for l <= 1/alpha
    the formula goes to or below 0, and a negative lambda would flip the sign of later TD errors' weights."""
    lam = 1.0 - 1.0 / (alpha * lengths.float().clamp(min=1))
    return lam.clamp(0.0, 1.0)


def group_normalized_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6,
                                scale: bool = True) -> torch.Tensor:
    """GRPO/DAPO: (r - mean of its group) / (std of its group + eps), per sequence. Groups are consecutive rows
    of `group_size` (group_prompts' layout). A group whose samples all scored the same gets 0."""
    if scores.numel() % group_size:
        raise ValueError(f"group advantages: {scores.numel()} scores are not groups of {group_size}")
    g = scores.float().view(-1, group_size)
    centred = g - g.mean(-1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (g.std(-1, keepdim=True) + eps)
    return centred.view(-1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to zero mean, unit variance over the masked entries (PPO advantage normalisation)."""
    m = mask.float()
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m
