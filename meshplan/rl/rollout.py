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
    """Greedy held-out accuracy and mean response length over the whole eval split, and the accuracy on its
    shorter and longer half (by the worked solution's length, split at the median): whether long chains fail
    more is what the chain task is for."""
    rank, world = rank_world()
    mine = shard(task.eval_problems, rank, world)
    median = sorted(len(p.working) for p in task.eval_problems)[len(task.eval_problems) // 2]
    counts = torch.zeros(5, dtype=torch.long)  # correct, tokens, long problems, correct long ones, correct short
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        r = generate(model, prompt_ids(task, chunk), max_new_tokens, task.tokenizer.EOS, task.tokenizer.PAD,
                     temperature=0.0)
        correct, _ = score(task, r, chunk, 0.0)
        long = torch.tensor([len(p.working) >= median for p in chunk])
        counts += torch.stack([correct.sum(), r.response_lens.sum(), long.sum(), (correct & long).sum(),
                               (correct & ~long).sum()])
    c, tokens, n_long, c_long, c_short = (int(v) for v in sum(all_gather_objects(counts)))
    n = len(task.eval_problems)
    return {"eval_accuracy": c / n, "eval_response_len": tokens / n,
            "eval_accuracy_long": c_long / max(n_long, 1), "eval_accuracy_short": c_short / max(n - n_long, 1)}
