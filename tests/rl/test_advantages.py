"""GAE against a direct sum, MC returns, length-adaptive lambda, group normalisation, decoupled GAE."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshplan.rl.advantages import (
    final_token_rewards,
    gae,
    group_normalized_advantages,
    length_adaptive_lambda,
    monte_carlo_returns,
    whiten,
)
from meshplan.rl.algorithms import AlgoConfig, advantages_and_returns


def direct_gae(r, v, lam, gamma):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over one episode, V after the last step = 0; straight from the
    definition, no recursion."""
    n = len(r)
    vv = list(v) + [0.0]
    delta = [r[t] + gamma * vv[t + 1] - vv[t] for t in range(n)]
    return [sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)]


@st.composite
def episodes(draw):
    rows, width = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    floats = st.floats(-2, 2, allow_nan=False, width=32)
    rewards = torch.tensor(draw(st.lists(st.lists(floats, min_size=width, max_size=width), min_size=rows,
                                         max_size=rows)))
    values = torch.tensor(draw(st.lists(st.lists(floats, min_size=width, max_size=width), min_size=rows,
                                        max_size=rows)))
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for i in range(rows):  # one contiguous span per row (the response), possibly empty
        start = draw(st.integers(0, width))
        mask[i, start : start + draw(st.integers(0, width - start))] = True
    lams = draw(st.lists(st.floats(0, 1), min_size=rows, max_size=rows))
    return rewards, values, mask, lams, draw(st.sampled_from([1.0, 0.9]))


@given(episodes(), st.booleans())
@settings(max_examples=150, deadline=None)
def test_gae_equals_direct_sum(ep, per_row):
    rewards, values, mask, lams, gamma = ep
    lam = torch.tensor(lams) if per_row else lams[0]
    adv, ret = gae(rewards, values, mask, lam, gamma)
    for i in range(rewards.shape[0]):
        idx = mask[i].nonzero().squeeze(-1).tolist()
        li = lams[i] if per_row else lams[0]
        want = direct_gae(rewards[i, idx].tolist(), values[i, idx].tolist(), li, gamma)
        torch.testing.assert_close(adv[i, idx], torch.tensor(want), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ret[i, idx], torch.tensor(want) + values[i, idx], atol=1e-4, rtol=1e-4)
        assert (adv[i, ~mask[i]] == 0).all() and (ret[i, ~mask[i]] == 0).all()


def test_final_token_rewards_and_mc_returns():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    r = final_token_rewards(torch.tensor([1.0, -1.0, 5.0]), mask)
    assert r.tolist() == [[0, 0, 0, 1, 0], [0, -1, 0, 0, 0], [0, 0, 0, 0, 0]]
    # gamma = 1, reward on the last token only: every response token's return is the sequence's reward
    assert monte_carlo_returns(r, mask).tolist() == [[0, 1, 1, 1, 0], [-1, -1, 0, 0, 0], [0, 0, 0, 0, 0]]
    # lambda = 1 returns do not depend on the values (they telescope away)
    _, ret = gae(r, torch.randn(3, 5), mask, 1.0)
    torch.testing.assert_close(ret, monte_carlo_returns(r, mask))


def test_length_adaptive_lambda_values():
    lam = length_adaptive_lambda(torch.tensor([1000, 200, 100, 40, 20, 10]), alpha=0.05)
    # 1 - 1/(0.05 l): 0.98, 0.9, 0.8, 0.5, 0; below l = 20 the formula is negative and is clamped to 0
    torch.testing.assert_close(lam, torch.tensor([0.98, 0.9, 0.8, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(length_adaptive_lambda(torch.tensor([20]), alpha=1.0), torch.tensor([0.95]))


def test_group_normalized_advantages():
    s = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_normalized_advantages(s, 4)
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased std of (1, 0, 0, 0) = 0.5
    torch.testing.assert_close(a[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6))
    assert (a[4:] == 0).all()  # an all-right group carries no signal
    centred = group_normalized_advantages(s, 4, scale=False)[:4]
    torch.testing.assert_close(centred, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_decoupled_gae_uses_separate_lambdas():
    mask = torch.ones(2, 4, dtype=torch.bool)
    scores = torch.tensor([1.0, 0.0])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.9], [0.5, 0.4, 0.2, 0.1]])
    rewards = final_token_rewards(scores, mask)
    a = AlgoConfig(length_adaptive_gae=False, lambda_policy=0.5, lambda_critic=1.0, decoupled_gae=True)
    out = advantages_and_returns(a, scores, mask, torch.tensor([4, 4]), 2, values)
    torch.testing.assert_close(out["advantages"], gae(rewards, values, mask, 0.5)[0])
    torch.testing.assert_close(out["returns"], scores[:, None].expand(2, 4))  # lambda_critic = 1: MC returns
    coupled = AlgoConfig(length_adaptive_gae=False, lambda_policy=0.5, decoupled_gae=False)
    out = advantages_and_returns(coupled, scores, mask, torch.tensor([4, 4]), 2, values)
    torch.testing.assert_close(out["returns"], gae(rewards, values, mask, 0.5)[1])
    # length-adaptive: each row's own lambda = 1 - 1/(alpha l)
    la = AlgoConfig(alpha=0.5)
    out = advantages_and_returns(la, scores, mask, torch.tensor([4, 2]), 2, values)
    torch.testing.assert_close(out["lambda_policy"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(out["advantages"], gae(rewards, values, mask, torch.tensor([0.5, 0.0]))[0])


def test_group_path_and_whiten():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    a = AlgoConfig(critic=False)
    out = advantages_and_returns(a, torch.tensor([1.0, 0.0]), mask, torch.tensor([2, 1]), 2, None)
    assert "returns" not in out
    assert out["advantages"][0, 0] > 0 and out["advantages"][0, 0] == out["advantages"][0, 1]
    assert out["advantages"][0, 2] == 0 and out["advantages"][1, 0] < 0
    w = whiten(torch.tensor([[1.0, 2.0, 99.0], [3.0, 0.0, 0.0]]), mask)
    vals = w[mask]
    assert abs(float(vals.mean())) < 1e-6 and abs(float(vals.var(unbiased=False)) - 1) < 1e-4 and w[0, 2] == 0


def test_three_token_episode_by_hand():
    """VAPO's decoupled GAE on one 3-token episode, every number worked out on paper (gamma = 1, reward 1 on the
    last token, V = (0.2, 0.5, 0.8), V after the episode = 0):
        delta = (0 + 0.5 - 0.2, 0 + 0.8 - 0.5, 1 + 0 - 0.8) = (0.3, 0.3, 0.2)
        critic, lambda_critic = 1.0: R_t = sum of the rewards to go = (1, 1, 1)
        policy, lambda_policy = 0.95 (paper's PPO value): A_2 = 0.2, A_1 = 0.3 + 0.95 * 0.2 = 0.49,
                                                          A_0 = 0.3 + 0.95 * 0.49 = 0.7655
        length-adaptive, alpha = 0.05 (paper): lambda = 1 - 1/(0.05 * 3) < 0 -> clamped to 0, A = delta
        length-adaptive, alpha = 1: lambda = 1 - 1/3 = 2/3, A_1 = 0.3 + 0.2 * 2/3, A_0 = 0.3 + (2/3) A_1
    Mutations tried: `gamma * lam * next_valid * running` -> `- gamma * ...` in advantages.gae (returns become
    (0.4, 0.6, 1.0): fails)."""
    mask = torch.tensor([[False, True, True, True, False]])  # one prompt position, 3 actions, padding
    values = torch.tensor([[9.0, 0.2, 0.5, 0.8, 9.0]])  # off-mask values must not leak in
    scores, lens = torch.tensor([1.0]), torch.tensor([3])

    def run(**flags):
        out = advantages_and_returns(AlgoConfig(**flags), scores, mask, lens, 1, values)
        return out["advantages"][0, 1:4].tolist(), out["returns"][0].tolist()

    adv, ret = run(length_adaptive_gae=False, lambda_policy=0.95, lambda_critic=1.0)
    assert ret == pytest.approx([0.0, 1.0, 1.0, 1.0, 0.0], abs=1e-6)
    assert adv == pytest.approx([0.7655, 0.49, 0.2], abs=1e-6)
    adv, ret = run(alpha=0.05)
    assert adv == pytest.approx([0.3, 0.3, 0.2], abs=1e-6) and ret[1:4] == pytest.approx([1.0] * 3, abs=1e-6)
    a1 = 0.3 + 0.2 * 2 / 3
    adv, _ = run(alpha=1.0)
    assert adv == pytest.approx([0.3 + 2 / 3 * a1, a1, 0.2], abs=1e-6)
    # coupled (PPO): the critic's targets use lambda_policy too: R = A + V = (0.9655, 0.99, 1.0)
    adv, ret = run(length_adaptive_gae=False, lambda_policy=0.95, decoupled_gae=False)
    assert ret[1:4] == pytest.approx([0.9655, 0.99, 1.0], abs=1e-6)
