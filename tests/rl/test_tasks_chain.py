"""The chain task: worked walks follow the rule, lengths span ~20 -> ~200 tokens and mix within a batch, the eval
split is held out, only the final answer is rewarded."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshplan.rl.config import RLConfigError, config_from_dict
from meshplan.rl.tasks import PromptSampler, build_task
from meshplan.rl.tasks_chain import MULTIPLIERS, ChainTask, chain_working


def test_worked_example():
    p = chain_working(1, 3, 8, 4)  # Fibonacci mod 10 from (3, 8): 1, 9, 0, 9
    assert (p.prompt, p.working, p.answer) == ("a38|04=", "04:38,03:81,02:19,01:90,00:09>09", "09")
    p = chain_working(3, 2, 7, 2)  # (2, 7) -> (7, 3*7 + 2 = 23 -> 3) -> (3, 3*3 + 7 = 16 -> 6)
    assert p.working == "02:27,01:73,00:36>36" and p.prompt == "c27|02="


@given(st.integers(1, 9), st.integers(0, 9), st.integers(0, 9), st.integers(1, 99))
@settings(max_examples=200, deadline=None)
def test_working_replays_the_rule(m, a, b, n):
    p = chain_working(m, a, b, n)
    assert p.prompt == f"{MULTIPLIERS[m - 1]}{a}{b}|{n:02d}="
    steps, answer = p.working.split(">")
    first, *steps = steps.split(",")
    assert first == f"{n:02d}:{a}{b}"  # the copy of the start
    assert len(steps) == n and len(p.working) + 1 == 6 * n + 9  # + EOS
    x, y = a, b
    for i, s in enumerate(steps):  # each step: the countdown, then the pair from the step before it
        assert s[:3] == f"{n - 1 - i:02d}:"
        assert (int(s[3]), int(s[4])) == (y, (m * y + x) % 10)
        x, y = int(s[3]), int(s[4])
    assert answer == p.answer == f"{x}{y}"


def test_lengths_span_and_mix_within_a_batch():
    task = ChainTask(3, 32, rules=9, eval_size=64)
    tok = task.tokenizer
    lens = [len(tok.encode(p.working, eos=True)) for p in PromptSampler(task, 0).draw(64)]
    assert min(lens) >= 27 and max(lens) <= task.max_response_len == 201
    assert max(lens) - min(lens) > 120 and np.std(lens) > 40  # one batch holds short and long responses
    for p in task.eval_problems:
        assert len(tok.encode(p.prompt, bos=True)) <= task.max_prompt_len


def test_eval_split_is_held_out_and_only_the_answer_is_rewarded():
    task = ChainTask(3, 6, rules=2, eval_size=100, eval_seed=7)
    assert [p.prompt for p in task.eval_problems] == [p.prompt for p in ChainTask(3, 6, 2, 100, 7).eval_problems]
    held_out = {p.prompt for p in task.eval_problems}
    assert len(held_out) == 100 and not held_out & {p.prompt for p in PromptSampler(task, 0).draw(1000)}
    p = chain_working(1, 3, 8, 5)
    assert task.is_correct(p.working, p)
    assert task.is_correct("garbage>99", p) and p.answer == "99"  # the working is not checked, only the answer
    assert not task.is_correct(p.working[:-1] + "8", p) and not task.is_correct(p.working.split(">")[0], p)


def test_config_builds_the_task_and_names_bad_fields():
    d = {"model": "tiny", "algo": {"preset": "grpo"}, "task": {"name": "chain", "min_steps": 2, "max_steps": 4,
                                                             "rules": 3, "eval_size": 16}}
    task = build_task(config_from_dict(d).task)
    assert isinstance(task, ChainTask) and (task.min_steps, task.max_steps, task.rules) == (2, 4, 3)
    for field, value, msg in [("name", "sort", "rl.task.name"), ("rules", 10, "rl.task.rules"),
                              ("max_steps", 100, "rl.task.min_steps"), ("eval_size", 5000, "rl.task.eval_size")]:
        with pytest.raises(RLConfigError, match=msg):
            config_from_dict({**d, "task": {**d["task"], field: value}})
    with pytest.raises(RLConfigError, match="rl.warmup.seed"):
        config_from_dict({**d, "warmup": {"seed": -2}})
