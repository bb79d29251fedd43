"""The arithmetic task: worked solutions are right, the eval split is held out, the tokenizer round-trips."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshplan.rl.tasks import ArithmeticTask, CharTokenizer, PromptSampler, column_working, reward


def test_worked_examples():
    p = column_working(347, 85, "+")
    assert (p.prompt, p.working, p.answer) == ("347+85=", "7+5+0=12,4+8+1=13,3+0+1=04:432", "432")
    p = column_working(402, 35, "-")
    assert (p.prompt, p.working, p.answer) == ("402-35=", "2-5-0=17,0-3-1=16,4-0-1=03:367", "367")


@given(st.integers(0, 9999), st.integers(0, 9999), st.sampled_from("+-"))
@settings(max_examples=200, deadline=None)
def test_working_is_consistent_column_arithmetic(a, b, op):
    if op == "-" and a < b:
        a, b = b, a
    p = column_working(a, b, op)
    steps, answer = p.working.split(":")
    assert answer == str(a + b if op == "+" else a - b)
    digits, carry = [], 0
    for step in steps.split(","):  # replay the columns: each uses the previous column's carry
        lhs, rhs = step.split("=")
        x, y, c = (int(v) for v in lhs.split(op))
        assert c == carry
        carry, d = int(rhs[0]), int(rhs[1])
        if op == "+":
            assert 10 * carry + d == x + y + c
        else:
            assert d - 10 * carry == x - y - c
        digits.append(str(d))
    full = "".join(reversed(digits)).lstrip("0") or "0"
    if op == "+" and carry:
        full = "1" + "".join(reversed(digits))
    assert full == answer


def test_eval_split_is_held_out_and_fixed():
    task = ArithmeticTask(1, 2, "+-", eval_size=64, eval_seed=7)
    again = ArithmeticTask(1, 2, "+-", eval_size=64, eval_seed=7)
    assert [p.prompt for p in task.eval_problems] == [p.prompt for p in again.eval_problems]
    assert len({p.prompt for p in task.eval_problems}) == 64
    held_out = {p.prompt for p in task.eval_problems}
    train = PromptSampler(task, seed=0).draw(2000)
    assert not held_out & {p.prompt for p in train}


def test_lengths_fit_the_declared_maxima():
    task = ArithmeticTask(1, 3, "+-", eval_size=8)
    tok = task.tokenizer
    for p in PromptSampler(task, 1).draw(500):
        assert len(tok.encode(p.prompt, bos=True)) <= task.max_prompt_len
        assert len(tok.encode(p.working, eos=True)) <= task.max_response_len


def test_sampler_state_round_trips():
    task = ArithmeticTask(1, 3, "+", eval_size=8)
    s = PromptSampler(task, 3)
    s.draw(5)
    state = s.state_dict()
    a = s.draw(10)
    s.load_state_dict(state)
    assert s.draw(10) == a


def test_tokenizer_and_reward():
    tok = CharTokenizer("0123456789+-=,:")
    ids = tok.encode("12+3=", bos=True, eos=True)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS and tok.vocab_size == 18 <= 256
    assert tok.decode(ids + [tok.PAD, 5]) == "12+3="
    assert tok.decode([7, 200, 8]) == "4?5"  # ids the model may emit outside the alphabet
    with pytest.raises(ValueError, match="not in the tokenizer alphabet"):
        tok.encode("a")
    task = ArithmeticTask(1, 1, "+", eval_size=4)
    p = column_working(3, 4, "+")
    assert task.is_correct("3+4+0=07:7", p) and not task.is_correct("3+4+0=07:8", p)
    assert not task.is_correct("3+4+0=07", p)
    assert reward(True) == 1.0 and reward(False) == 0.0 and reward(False, -1.0) == -1.0
    assert np.isclose(reward(False, wrong=-1), -1)
