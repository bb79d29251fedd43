"""From problems to a scored global batch: group sampling on each rank's share, rule-based rewards, gather.

Also the held-out evaluation (greedy decoding of the eval split, split across ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import all_gather_objects, rank_world, shard
from .sampling import Rollout, generate, group_prompts
from .tasks import HeldOutTask, Problem, reward


@dataclass
class ScoredBatch:
    rollout: Rollout
    correct: torch.Tensor  # [N] bool
    rewards: torch.Tensor  # [N] float, the rule-based reward
    group_size: int  # rows g*K .. g*K+K-1 share a prompt

    def __len__(self) -> int:
        return len(self.rollout)

    def select_groups(self, keep: torch.Tensor) -> "ScoredBatch":
        """Keep the groups where `keep` [G] is True."""
        rows = (keep[:, None].expand(-1, self.group_size)).reshape(-1).nonzero().squeeze(-1)
        return ScoredBatch(self.rollout.select(rows), self.correct[rows], self.rewards[rows], self.group_size)

    @staticmethod
    def cat(parts: list["ScoredBatch"], pad_id: int) -> "ScoredBatch":
        return ScoredBatch(Rollout.cat([p.rollout for p in parts], pad_id), torch.cat([p.correct for p in parts]),
                           torch.cat([p.rewards for p in parts]), parts[0].group_size)


def prompt_ids(task: HeldOutTask, problems: list[Problem]) -> list[list[int]]:
    return [task.tokenizer.encode(p.prompt, bos=True) for p in problems]


def score(task: HeldOutTask, rollout: Rollout, problems: list[Problem], wrong_reward: float):
    texts = [task.tokenizer.decode(rollout.response_ids(i)) for i in range(len(rollout))]
    correct = torch.tensor([task.is_correct(t, p) for t, p in zip(texts, problems)], dtype=torch.bool)
    rewards = torch.tensor([reward(bool(c), wrong_reward) for c in correct])
    return correct, rewards


@torch.no_grad()
def collect(model, task: HeldOutTask, problems: list[Problem], samples_per_prompt: int, max_new_tokens: int,
            temperature: float, top_p: float, wrong_reward: float, generator: torch.Generator) -> ScoredBatch:
    """Sample K responses to each of this rank's share of `problems` (the global list, same on every rank) and
    return the global batch, in problem order, on every rank."""
    rank, world = rank_world()
    mine = shard(problems, rank, world)
    rows = group_prompts(mine, samples_per_prompt)
    r = generate(model, prompt_ids(task, rows), max_new_tokens, task.tokenizer.EOS, task.tokenizer.PAD,
                 temperature, top_p, generator)
    correct, rewards = score(task, r, rows, wrong_reward)
    local = ScoredBatch(r, correct, rewards, samples_per_prompt)
    return ScoredBatch.cat(all_gather_objects(local), task.tokenizer.PAD)


@torch.no_grad()
def evaluate(model, task: HeldOutTask, max_new_tokens: int, batch_size: int = 256) -> dict[str, float]:
    """Greedy held-out accuracy and mean response length over the whole eval split."""
    rank, world = rank_world()
    mine = shard(task.eval_problems, rank, world)
    n_correct, n_tokens = 0, 0
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        r = generate(model, prompt_ids(task, chunk), max_new_tokens, task.tokenizer.EOS, task.tokenizer.PAD,
                     temperature=0.0)
        correct, _ = score(task, r, chunk, 0.0)
        n_correct += int(correct.sum())
        n_tokens += int(r.response_lens.sum())
    totals = all_gather_objects((n_correct, n_tokens))
    n = len(task.eval_problems)
    return {"eval_accuracy": sum(c for c, _ in totals) / n, "eval_response_len": sum(t for _, t in totals) / n}
