"""Cached decoding equals the full forward; generate's layout, log-probs, EOS and padding."""
import torch

from meshplan.models import build_model, load_config
from meshplan.rl.sampling import Rollout, forward_cached, generate, group_prompts, new_cache, sample_next

EOS, PAD = 2, 0


def _model(seed=0):
    return build_model(load_config("tiny"), seed=seed)


def test_cached_logits_equal_full_forward_at_every_position():
    model = _model()
    tokens = torch.randint(3, 256, (4, 40), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    for prefill in (1, 9):  # one token at a time, and a prompt chunk then single tokens
        cache = new_cache(model, 4, 40)
        parts = [forward_cached(model, tokens[:, :prefill], 0, cache)]
        parts += [forward_cached(model, tokens[:, t : t + 1], t, cache) for t in range(prefill, 40)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_generate_layout_logprobs_and_stopping():
    model = _model(1)
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 4]]
    r = generate(model, prompts, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    for i, p in enumerate(prompts):
        assert r.tokens[i, : len(p)].tolist() == p  # prompts are teacher-forced, right-padded layout
        n = int(r.response_lens[i])
        assert r.mask[i].nonzero().squeeze(-1).tolist() == list(range(len(p) - 1, len(p) - 1 + n))
        assert (r.tokens[i, len(p) + n :] == PAD).all()
    # the recorded sampling log-probs are the full forward's log-probs of the sampled tokens
    logp = model(r.tokens)[:, :-1].log_softmax(-1).gather(-1, r.tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp * r.mask, r.logprobs, atol=1e-5, rtol=1e-5)


def _with_eos_logit(model, value: float):
    """Add an output bias that pushes EOS's logit to `value` (the head has no bias; nn.Linear uses one if set)."""
    bias = torch.zeros(model.config.vocab_size)
    bias[EOS] = value
    model.output.bias = torch.nn.Parameter(bias)
    return model


def test_eos_stops_a_row_and_truncation_is_flagged():
    model = _with_eos_logit(_model(2), 100.0)  # every row ends with its first response token
    r = generate(model, [[1, 5], [1, 6, 7]], 8, EOS, PAD, generator=torch.Generator().manual_seed(0))
    assert r.response_lens.tolist() == [1, 1] and not r.truncated.any()
    assert r.tokens[0, 2] == EOS and r.tokens[1, 3] == EOS and r.tokens[0, 3] == PAD
    model = _with_eos_logit(_model(3), -100.0)  # never ends: stopped by max_new_tokens
    r = generate(model, [[1, 5]], 5, EOS, PAD, temperature=0.0)
    assert r.response_lens.tolist() == [5] and r.truncated.all()


def test_rows_that_finish_leave_the_batch_without_changing_the_others():
    """generate drops finished rows from the decoding batch (and their KV cache): the recorded log-probs still
    equal the full forward's, and a greedy row decodes the same in a batch as alone."""
    model = _with_eos_logit(_model(4), 2.0)  # EOS likely but not certain: rows end at different steps
    prompts = [[1] + list(range(5, 5 + k % 4)) for k in range(12)]
    r = generate(model, prompts, 40, EOS, PAD, generator=torch.Generator().manual_seed(0))
    assert len(set(r.response_lens.tolist())) > 3  # the batch shrank several times
    logp = model(r.tokens)[:, :-1].log_softmax(-1).gather(-1, r.tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp * r.mask, r.logprobs, atol=1e-5, rtol=1e-5)
    for i, p in enumerate(prompts):
        n = int(r.response_lens[i])
        assert (r.tokens[i, len(p) + n :] == PAD).all() and r.mask[i].sum() == n
    model = _with_eos_logit(_model(5), 0.0)  # greedy: 3 of 12 rows stop at 12 tokens
    batch = generate(model, prompts, 40, EOS, PAD, temperature=0.0)
    assert len(set(batch.response_lens.tolist())) > 1
    for i, p in enumerate(prompts):
        alone = generate(model, [p], 40, EOS, PAD, temperature=0.0)
        assert batch.response_ids(i) == alone.response_ids(0)


def test_greedy_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 2.5]])
    tok, lp = sample_next(logits, 0.0, 1.0, None)
    assert tok.tolist() == [1, 2]
    torch.testing.assert_close(lp, logits.log_softmax(-1)[[0, 1], [1, 2]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, 0.5, g)[0] for _ in range(50)])
    assert (draws == torch.tensor([1, 2])).all()  # top-p 0.5 keeps only the most likely token here


def test_group_prompts_and_cat():
    assert group_prompts([[1], [2]], 3) == [[1], [1], [1], [2], [2], [2]]
    model = _model()
    a = generate(model, [[1, 5]], 3, EOS, PAD, temperature=0.0)
    b = generate(model, [[1, 5, 6, 7]], 6, EOS, PAD, temperature=0.0)
    c = Rollout.cat([a, b], PAD)
    assert c.tokens.shape[1] == max(a.tokens.shape[1], b.tokens.shape[1]) and len(c) == 2
    assert c.select([1]).tokens[0, : b.tokens.shape[1]].tolist() == b.tokens[0].tolist()
