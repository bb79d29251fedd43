"""Rollouts: batched sampling with a KV cache, and group sampling (P prompts x K samples).

The reference Transformer has no cache, so cached decoding is written here functionally from the model's own
submodules and weights (attention_norm, attention.qkv at absolute positions and wo, ffn_norm,
feed_forward on [B, 1, D], norm, output). tests/rl/test_sampling.py checks that it gives the full forward's
logits at every position.

Layout: every sequence is BOS prompt response [EOS] PAD..., right-padded and starting at position 0, which is the
layout the plain full forward scores correctly (causal attention never lets a real token see a later pad). Rows
with different prompt lengths decode in lockstep: at step t a row still inside its prompt is fed its next prompt
token (teacher-forced) instead of a sample, so all rows share one position and one cache index.
Note: with a capacity-limited MoE (capacity_factor set) routing depends on which tokens share a batch, so cached
and full logits can differ; the RL models are dropless.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshplan.models import Transformer


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, T] long
    prompt_lens: torch.Tensor  # [N] long, BOS included
    response_lens: torch.Tensor  # [N] long, EOS included when emitted
    logprobs: torch.Tensor  # [N, T-1] float: log p(tokens[:, t+1] | tokens[:, :t+1]) under the sampler; 0 off-mask
    mask: torch.Tensor  # [N, T-1] bool: action t (which emits tokens[:, t+1]) is a response token
    truncated: torch.Tensor  # [N] bool: stopped by max_new_tokens, not by EOS

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def response_ids(self, i: int) -> list[int]:
        p = int(self.prompt_lens[i])
        return self.tokens[i, p : p + int(self.response_lens[i])].tolist()

    def select(self, idx: torch.Tensor | list[int]) -> "Rollout":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Rollout(*(getattr(self, f)[idx] for f in _FIELDS))

    @staticmethod
    def cat(parts: list["Rollout"], pad_id: int) -> "Rollout":
        """Concatenate along the batch, right-padding every part to the longest sequence."""
        t = max(p.tokens.shape[1] for p in parts)
        out = {f: [] for f in _FIELDS}
        for p in parts:
            extra = t - p.tokens.shape[1]
            out["tokens"].append(F.pad(p.tokens, (0, extra), value=pad_id))
            out["logprobs"].append(F.pad(p.logprobs, (0, extra)))
            out["mask"].append(F.pad(p.mask, (0, extra)))
            for f in ("prompt_lens", "response_lens", "truncated"):
                out[f].append(getattr(p, f))
        return Rollout(*(torch.cat(out[f]) for f in _FIELDS))


_FIELDS = ("tokens", "prompt_lens", "response_lens", "logprobs", "mask", "truncated")


# ---- cached forward -------------------------------------------------------------------------------------------
def new_cache(model: Transformer, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.config
    dtype = model.tok_embeddings.weight.dtype
    shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in model.layers]


def _cached_attention(attn, x: torch.Tensor, pos: int, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
    """Attention of x (absolute positions pos..pos+s-1) over the cache plus itself; writes x's keys/values."""
    b, s, _ = x.shape
    q, k, v = attn.qkv(x, pos)
    cache_k[:, pos : pos + s] = k
    cache_v[:, pos : pos + s] = v
    keys, vals = cache_k[:, : pos + s], cache_v[:, : pos + s]
    # query i sits at absolute position pos+i and may see keys 0..pos+i. enable_gqa: each group of
    # n_heads / n_kv_heads query heads reads its KV head in place (repeating the whole cache every token cost
    # 16% of a rollout, benchmarks/README.md)
    allowed = torch.arange(pos + s)[None, :] <= (pos + torch.arange(s))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                         attn_mask=None if s == 1 else allowed,
                                         enable_gqa=attn.n_heads != attn.n_kv_heads)
    return attn.wo(out.transpose(1, 2).reshape(b, s, -1))


@torch.no_grad()
def forward_cached(model: Transformer, tokens: torch.Tensor, pos: int, cache) -> torch.Tensor:
    """Logits [B, s, V] for `tokens` [B, s] at absolute positions pos..pos+s-1, given the cache of 0..pos-1."""
    h = model.tok_embeddings(tokens)
    for layer, (ck, cv) in zip(model.layers, cache):
        h = h + _cached_attention(layer.attention, layer.attention_norm(h), pos, ck, cv)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h))


# ---- sampling -------------------------------------------------------------------------------------------------
def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """Next tokens [B] and their log-probs [B] under softmax(logits / temperature) -- the distribution the
    trainer's forward recomputes; top-p only narrows what is drawn. temperature 0 is greedy."""
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
    logp = (logits / temperature).log_softmax(-1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
    """Sample one response per prompt (prompt ids include BOS). Stops a row at EOS or after max_new_tokens."""
    n = len(prompts)
    plens = torch.tensor([len(p) for p in prompts])
    total = int(plens.max()) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"rollout: longest prompt {int(plens.max())} + max_new_tokens {max_new_tokens} exceeds "
                         f"model.max_seq_len {model.config.max_seq_len}")
    tokens = torch.full((n, total), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    logprobs = torch.zeros(n, total - 1)
    mask = torch.zeros(n, total - 1, dtype=torch.bool)
    rlens = torch.zeros(n, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    cache = new_cache(model, n, total)

    start = int(plens.min())
    logits = forward_cached(model, tokens[:, :start], 0, cache)[:, -1]
    rows = torch.arange(n)  # the rows still in the decoding batch (finished ones are dropped, see below)
    end = total
    for t in range(start, total):  # logits predict tokens[rows, t]
        tok, lp = sample_next(logits, temperature, top_p, generator)
        was_done = done[rows]
        gen = (t >= plens[rows]) & ~was_done
        tokens[rows, t] = torch.where(gen, tok, torch.where(was_done, pad_id, tokens[rows, t]))
        logprobs[rows, t - 1] = torch.where(gen, lp, 0.0)
        mask[rows, t - 1] = gen
        rlens[rows] += gen.long()
        done[rows] = was_done | (gen & ((tok == eos_id) | (rlens[rows] >= max_new_tokens)))
        if bool(done.all()):
            end = t + 1
            break
        live = ~done[rows]
        if 4 * int(live.sum()) <= 3 * len(rows):
            # a quarter of the batch has finished: decode only the live rows from here (the chain task's
            # responses run 27..201 tokens, so this saves ~40% of the decoding; profile in benchmarks/README.md)
            keep = live.nonzero().squeeze(-1)
            rows, cache = rows[keep], [(k[keep], v[keep]) for k, v in cache]
        logits = forward_cached(model, tokens[rows, t : t + 1], t, cache)[:, -1]
    truncated = tokens[torch.arange(n), (plens + rlens - 1).clamp(max=end - 1)] != eos_id
    return Rollout(tokens[:, :end], plens, rlens, logprobs[:, : end - 1], mask[:, : end - 1], truncated)


def group_prompts(prompts: list[list[int]], samples_per_prompt: int) -> list[list[int]]:
    """Group sampling: each of P prompts repeated K times, group-major (rows g*K .. g*K+K-1 are group g)."""
    return [p for p in prompts for _ in range(samples_per_prompt)]
