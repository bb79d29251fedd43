"""Verifiable, procedurally generated tasks for CPU-sized RL, and the character tokenizer they share.

The task is column arithmetic written out the way it is done on paper, least-significant column first, so the
answer needs a variable number of steps (one per column) and the model must carry (or borrow) between them:

    prompt   "347+85="
    response "7+5+0=12,4+8+1=13,3+0+1=04:432"       a+b+carry = carry,digit per column, then ":" answer

    prompt   "402-35="
    response "2-5-0=17,0-3-1=16,4-0-1=03:367"       a-b-borrow: "1d" means borrowed (d = a-b-borrow+10)

Only the answer after ":" is rewarded (rule-based, docs/reference.md VAPO: 1 if correct, else 0 or -1). A held-out
eval split is fixed by its own seed and excluded from training prompts.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


class CharTokenizer:
    """One token per character of `alphabet`, after three specials. Ids are small, so any vocab >= len+3 fits."""

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"tokenizer alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self._id = {c: i + 3 for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 3

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            ids = [self._id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}") from None
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids) -> str:
        """Text of `ids` up to the first EOS; PAD and BOS are dropped. A model's vocabulary is usually larger than
        the alphabet: an id outside it decodes to "?" (so such a response is never correct)."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if i >= 3:
                out.append(self.alphabet[i - 3] if i - 3 < len(self.alphabet) else "?")
        return "".join(out)


@dataclass(frozen=True)
class Problem:
    prompt: str  # "347+85="
    working: str  # the full worked response, without EOS (the warm-up's supervised target)
    answer: str  # "432"


def column_working(a: int, b: int, op: str) -> Problem:
    """The written working of a+b or a-b (a >= b), one "x{op}y{op}c=cd" column per digit of a, lsd first."""
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    steps, carry = [], 0
    for i in range(n):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if op == "+":
            s = x + y + carry
            steps.append(f"{x}+{y}+{carry}={s // 10}{s % 10}")
            carry = s // 10
        else:
            s = x - y - carry
            borrow = int(s < 0)
            steps.append(f"{x}-{y}-{carry}={borrow}{s + 10 * borrow}")
            carry = borrow
    answer = str(a + b) if op == "+" else str(a - b)
    return Problem(prompt=f"{a}{op}{b}=", working=",".join(steps) + ":" + answer, answer=answer)


class HeldOutTask(abc.ABC):
    """What every task shares: a character tokenizer over `alphabet`, a held-out eval split of `eval_size`
    distinct prompts drawn with its own seed and never sampled for training, and an answer after the last
    `answer_mark`. A task defines _draw(rng) -> Problem and the prompt/response length bounds."""

    alphabet: str
    answer_mark: str

    @abc.abstractmethod
    def _draw(self, rng: np.random.Generator) -> Problem: ...

    def _hold_out(self, eval_size: int, eval_seed: int) -> None:
        self.tokenizer = CharTokenizer(self.alphabet)
        rng = np.random.default_rng(eval_seed)
        self.eval_problems, seen = [], set()
        while len(self.eval_problems) < eval_size:
            p = self._draw(rng)
            if p.prompt not in seen:
                seen.add(p.prompt)
                self.eval_problems.append(p)
        self._eval_prompts = frozenset(seen)

    def sample(self, rng: np.random.Generator) -> Problem:
        """A training problem: never one of the held-out eval prompts."""
        while True:
            p = self._draw(rng)
            if p.prompt not in self._eval_prompts:
                return p

    def extract_answer(self, response: str) -> str | None:
        """The text after the last answer mark, or None if the response never got to an answer."""
        return response.rsplit(self.answer_mark, 1)[1] if self.answer_mark in response else None

    def is_correct(self, response: str, problem: Problem) -> bool:
        return self.extract_answer(response) == problem.answer


class ArithmeticTask(HeldOutTask):
    """Column addition/subtraction of integers with min_digits..max_digits digits (each operand independently)."""

    alphabet, answer_mark = "0123456789+-=,:", ":"

    def __init__(self, min_digits: int = 1, max_digits: int = 3, ops: str = "+", eval_size: int = 256,
                 eval_seed: int = 12345):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"task: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if not ops or set(ops) - set("+-"):
            raise ValueError(f"task.ops: a non-empty string over '+-', got {ops!r}")
        self.min_digits, self.max_digits, self.ops = min_digits, max_digits, ops
        self._hold_out(eval_size, eval_seed)

    def _number(self, rng: np.random.Generator) -> int:
        digits = int(rng.integers(self.min_digits, self.max_digits + 1))
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(lo, 10 ** digits))

    def _draw(self, rng: np.random.Generator) -> Problem:
        a, b = self._number(rng), self._number(rng)
        op = self.ops[int(rng.integers(len(self.ops)))]
        if op == "-" and a < b:
            a, b = b, a
        return column_working(a, b, op)

    @property
    def max_prompt_len(self) -> int:
        return 2 * self.max_digits + 2 + 1  # digits, op, "=", BOS

    @property
    def max_response_len(self) -> int:
        # n columns of "x+y+c=cd" (8 each) joined by ",", then ":", an answer of up to n+1 digits, EOS: 10n+2
        return 10 * self.max_digits + 2


def reward(correct: bool, wrong: float = 0.0) -> float:
    """docs/reference.md VAPO: rule-based reward, 1 if correct, else `wrong` (0 or -1)."""
    return 1.0 if correct else wrong


TASKS = ("arithmetic", "chain")


def build_task(cfg):
    """cfg: rl.config.TaskConfig. "arithmetic": column addition/subtraction (~10-40 tokens); "chain":
    tasks_chain.ChainTask, walks whose working grows from ~20 to ~200 tokens with the problem."""
    if cfg.name == "chain":
        from .tasks_chain import ChainTask
        return ChainTask(cfg.min_steps, cfg.max_steps, cfg.rules, cfg.eval_size, cfg.eval_seed)
    return ArithmeticTask(cfg.min_digits, cfg.max_digits, cfg.ops, cfg.eval_size, cfg.eval_seed)


class PromptSampler:
    """The training-prompt stream. Its whole state is the numpy bit generator's, so a checkpoint can restore it."""

    def __init__(self, task: HeldOutTask, seed: int):
        self.task = task
        self.rng = np.random.default_rng(seed)

    def draw(self, n: int) -> list[Problem]:
        return [self.task.sample(self.rng) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
