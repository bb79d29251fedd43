"""Losses: clipped policy gradient (clip-higher, token- or sequence-level), value, positive-example LM, entropy.

Per-token tensors are [N, T] over action positions with a bool mask of the response tokens.
"""
from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [N, T, V] from the forward of tokens [N, T] -> [N, T-1]: log p(tokens[:, t+1] | tokens[:, :t+1])."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, token_level: bool) -> torch.Tensor:
    """Token-level (VAPO/DAPO): sum over every valid token of the batch / number of valid tokens, so each token
    weighs the same and a long response counts in proportion to its length. Sequence-level (PPO/GRPO): mean over
    each sequence's tokens, then mean over sequences, so every sequence weighs the same."""
    m = mask.float()
    if token_level:
        return (per_token * m).sum() / m.sum().clamp(min=1)
    per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
    has = (m.sum(-1) > 0).float()
    return (per_seq * has).sum() / has.sum().clamp(min=1)


def clipped_pg_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.28, token_level: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate with clip-higher (DAPO/VAPO): -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A).
    Returns (loss, clip fraction). A token is clipped when the clipped branch is the min and its gradient is 0:
    A > 0 and rho > 1+eps_high, or A < 0 and rho < 1-eps_low."""
    ratio = (logprobs - old_logprobs).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = aggregate(-torch.minimum(unclipped, clipped), mask, token_level)
    is_clipped = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))
    frac = (is_clipped & mask).float().sum() / mask.float().sum().clamp(min=1)
    return loss, frac.detach()


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, token_level: bool = True,
               old_values: torch.Tensor | None = None, clip: float | None = None) -> torch.Tensor:
    """0.5 (V - R)^2 over the response tokens; with `clip`, PPO's pessimistic value clipping around old_values."""
    err = (values.float() - returns) ** 2
    if clip is not None and old_values is not None:
        v_clip = old_values + (values.float() - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (v_clip - returns) ** 2)
    return 0.5 * aggregate(err, mask, token_level)


def positive_lm_loss(logprobs: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """VAPO's positive-example LM loss: NLL averaged over the tokens of the correct (reward 1) samples only.
    0 (with a gradient path) when the batch has no correct sample."""
    m = mask & correct[:, None]
    return -(logprobs * m.float()).sum() / m.float().sum().clamp(min=1)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distributions at the masked action positions (logits [N, T, V] of the
    forward; action t uses logits[:, t])."""
    logp = logits[:, :-1].float().log_softmax(-1)
    h = -(logp.exp() * logp).sum(-1)
    return aggregate(h, mask, token_level=True)
