"""A task whose written working grows with the problem: a Fibonacci-like walk mod 10, counted down step by step.

    prompt   "a38|04="                          rule m = 1 ("a"), start pair (3, 8), 4 steps
    response "04:38,03:81,02:19,01:90,00:09>09"   "kk:xy": countdown kk, then the pair; the first line copies the
                                                   start, each next one is (x, y) -> (y, (m*y + x) mod 10);
                                                   ">" then the final pair

Every step after the copy depends only on the step before it (a fixed offset back; measured: without the copy
line, a warmed-up model's first slip sat in the first two steps, which read the prompt), so a small model can
learn the rule. With n steps the response has 6n + 9 tokens (EOS included), 27 at n = 3 and 201 at n = 32; n is
drawn uniformly per problem, so every batch mixes short and long responses (what VAPO's length-adaptive GAE is
for). Once the per-step slip rate is small, long chains fail more often than short ones; after 200 warm-up steps
it is not small yet and accuracy is flat in n (benchmarks/README.md, rl_compare). Only the answer after ">" is
rewarded: 1 if it is the final pair, else 0 or -1 (docs/reference.md, "VAPO"); a guess is right 1 time in 100.

A tasks.HeldOutTask, as ArithmeticTask is: a tokenizer, a fixed held-out eval split excluded from training prompts,
sample(), is_correct() and the prompt/response length bounds.
"""
from __future__ import annotations

import numpy as np

from .tasks import HeldOutTask, Problem

MULTIPLIERS = "abcdefghi"  # the rule's multiplier m = 1..9, one letter each so the model finds it by content


def chain_working(m: int, a: int, b: int, steps: int) -> Problem:
    """The worked walk (x, y) -> (y, (m*y + x) mod 10) from the pair (a, b) for `steps` steps, after a copy of it."""
    if not (1 <= m <= 9 and 0 <= a <= 9 and 0 <= b <= 9 and 1 <= steps <= 99):
        raise ValueError(f"chain: need 1 <= m <= 9, digits a, b and 1 <= steps <= 99, got {m}, {a}, {b}, {steps}")
    x, y, parts = a, b, [f"{steps:02d}:{a}{b}"]
    for k in range(steps - 1, -1, -1):
        x, y = y, (m * y + x) % 10
        parts.append(f"{k:02d}:{x}{y}")
    answer = f"{x}{y}"
    return Problem(prompt=f"{MULTIPLIERS[m - 1]}{a}{b}|{steps:02d}=", working=",".join(parts) + ">" + answer,
                   answer=answer)


class ChainTask(HeldOutTask):
    """Fibonacci walks mod 10 of min_steps..max_steps steps from a random start pair."""

    alphabet, answer_mark = "0123456789:,|=>" + MULTIPLIERS, ">"

    def __init__(self, min_steps: int = 3, max_steps: int = 32, rules: int = 9, eval_size: int = 256,
                 eval_seed: int = 12345):
        if not 1 <= min_steps <= max_steps <= 99:
            raise ValueError(f"task: need 1 <= min_steps <= max_steps <= 99, got {min_steps}, {max_steps}")
        if not 1 <= rules <= 9:
            raise ValueError(f"task.rules: need 1 <= rules <= 9 (multipliers 1..rules), got {rules}")
        self.rules = rules
        space = 100 * rules * (max_steps - min_steps + 1)
        if eval_size > space // 2:
            raise ValueError(f"task.eval_size: {eval_size} exceeds half of the {space} distinct problems "
                             f"(training needs the rest)")
        self.min_steps, self.max_steps = min_steps, max_steps
        self._hold_out(eval_size, eval_seed)

    def _draw(self, rng: np.random.Generator) -> Problem:
        m = int(rng.integers(1, self.rules + 1))
        a, b = (int(v) for v in rng.integers(0, 10, size=2))
        return chain_working(m, a, b, int(rng.integers(self.min_steps, self.max_steps + 1)))

    @property
    def max_prompt_len(self) -> int:
        return 7 + 1  # "mab|nn=", BOS

    @property
    def max_response_len(self) -> int:
        return 6 * self.max_steps + 9  # n + 1 lines "kk:xy" joined by "," (6n + 5), ">" and the pair, EOS
