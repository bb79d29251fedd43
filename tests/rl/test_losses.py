"""Clipped PG (clip-higher, both bounds, advantage sign), token- vs sequence-level aggregation, LM and value."""
import math

import pytest
import torch

from meshplan.rl.losses import aggregate, clipped_pg_loss, entropy, positive_lm_loss, token_logprobs, value_loss


def test_token_level_and_sequence_level_differ_as_they_should():
    # sequence 0: one token with loss 1; sequence 1: three tokens with loss 0
    per_token = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert aggregate(per_token, mask, token_level=True) == pytest.approx(1 / 4)  # every token weighs the same
    assert aggregate(per_token, mask, token_level=False) == pytest.approx((1 / 1 + 0 / 3) / 2)  # every sequence
    # rows without tokens (padding) do not count as sequences
    padded, pmask = torch.cat([per_token, torch.zeros(1, 3)]), torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    assert aggregate(padded, pmask, token_level=False) == pytest.approx(0.5)


def _pg(ratio, adv, eps_low=0.2, eps_high=0.28):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, frac = clipped_pg_loss(logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1, dtype=torch.bool),
                                 eps_low, eps_high)
    loss.backward()
    return loss.item(), float(frac), float(logp.grad)


@pytest.mark.parametrize("ratio, adv, loss, clipped", [
    (1.5, +1.0, -1.28, True),   # A > 0, above 1 + eps_high: clipped to 1.28, no gradient
    (1.5, -1.0, 1.5, False),    # A < 0, above: the unclipped term is the min, gradient flows
    (0.5, -1.0, 0.8, True),     # A < 0, below 1 - eps_low: clipped to 0.8, no gradient
    (0.5, +1.0, -0.5, False),   # A > 0, below: unclipped, gradient flows
    (1.25, +1.0, -1.25, False),  # inside [0.8, 1.28]: unclipped
])
def test_clipping_at_both_bounds_with_the_advantage_sign(ratio, adv, loss, clipped):
    got_loss, frac, grad = _pg(ratio, adv)
    assert got_loss == pytest.approx(loss, abs=1e-6)
    assert frac == float(clipped)
    assert (grad == 0) == clipped
    if not clipped:  # d/dlogp of -ratio*A
        assert grad == pytest.approx(-ratio * adv, rel=1e-5)


def test_clip_higher_is_asymmetric():
    # ratio 1.25 with A > 0: inside VAPO/DAPO's eps_high = 0.28, clipped by PPO's symmetric 0.2
    assert _pg(1.25, 1.0, 0.2, 0.28)[1] == 0.0
    assert _pg(1.25, 1.0, 0.2, 0.2)[1] == 1.0 and _pg(1.25, 1.0, 0.2, 0.2)[0] == pytest.approx(-1.2)


def test_pg_aggregation_follows_the_flag():
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    tok, _ = clipped_pg_loss(logp, logp, adv, mask, token_level=True)
    seq, _ = clipped_pg_loss(logp, logp, adv, mask, token_level=False)
    assert float(tok) == pytest.approx(-1.0) and float(seq) == pytest.approx(-2.0)


def test_positive_lm_loss_counts_only_correct_samples():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-5.0, -5.0, -5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert float(positive_lm_loss(logp, mask, torch.tensor([True, False]))) == pytest.approx(1.5)
    assert float(positive_lm_loss(logp, mask, torch.tensor([False, False]))) == 0.0


def test_value_loss_and_clipping():
    v, r = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    m = torch.ones(1, 2, dtype=torch.bool)
    assert float(value_loss(v, r, m)) == pytest.approx(0.5 * (1 + 4) / 2)
    # clipped around old values 0: v_clip = (0.5, 0.5) -> max of squared errors = (1, 4) again (pessimistic)
    assert float(value_loss(v, r, m, old_values=torch.zeros(1, 2), clip=0.5)) == pytest.approx(1.25)


def test_token_logprobs_and_entropy():
    logits = torch.zeros(1, 3, 4)  # uniform over 4
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(token_logprobs(logits, tokens), torch.full((1, 2), -math.log(4)))
    assert float(entropy(logits, torch.ones(1, 2, dtype=torch.bool))) == pytest.approx(math.log(4))
