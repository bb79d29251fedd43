"""Supervised warm-up: a short run of next-token training on worked solutions, so RL starts from a policy with
non-zero (but far from perfect) held-out accuracy. Trains through the same Engine as RL."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from .engine import Engine
from .tasks import HeldOutTask


def supervised_batch(task: HeldOutTask, rng: np.random.Generator, batch_size: int):
    """tokens [B, T] (BOS prompt working EOS PAD...) and a [B, T-1] mask of the positions to learn (the response)."""
    tok = task.tokenizer
    problems = [task.sample(rng) for _ in range(batch_size)]
    seqs = [(tok.encode(p.prompt, bos=True), tok.encode(p.working, eos=True)) for p in problems]
    t = max(len(a) + len(b) for a, b in seqs)
    tokens = torch.full((batch_size, t), tok.PAD, dtype=torch.long)
    mask = torch.zeros(batch_size, t - 1, dtype=torch.bool)
    for i, (a, b) in enumerate(seqs):
        tokens[i, : len(a) + len(b)] = torch.tensor(a + b)
        mask[i, len(a) - 1 : len(a) + len(b) - 1] = True  # action t emits tokens[t + 1]
    return tokens, mask


def warmup(engine: Engine, task: HeldOutTask, steps: int, batch_size: int, seed: int, progress=None) -> list[float]:
    """`steps` optimizer steps of response-token NLL. Returns the losses. Every rank draws the same batches
    (same seed), as the engine's forward takes the global batch."""
    rng = np.random.default_rng([seed, 0x5F7])  # a stream of its own, apart from RL's prompt sampler
    losses = []
    for _ in range(steps):
        tokens, mask = supervised_batch(task, rng, batch_size)
        logp = engine(tokens)[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        loss = -(logp * mask).sum() / mask.sum()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def cache_key(model_cfg: dict, task_cfg: dict, warmup_cfg: dict, seed: int) -> str:
    """What the warmed-up weights depend on; a cache file from another setting is not reused."""
    # the reward of a wrong answer never reaches the warm-up (supervised on worked solutions): runs that differ
    # only in it share one warm-up
    task_cfg = {k: v for k, v in task_cfg.items() if k != "wrong_reward"}
    d = {"model": model_cfg, "task": task_cfg, "warmup": {k: v for k, v in warmup_cfg.items() if k != "cache"},
         "seed": seed}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
