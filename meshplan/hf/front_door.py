"""The front door of a Hugging Face causal LM: tokens [B, S] -> logits [B, S, V], made of meshplan's own blocks.

HF models do not fx-trace (their mask and cache code is data-dependent control flow), and their blocks are not
the math meshplan's strategies implement. An adapter (adapters.py) instead rebuilds the decoder from meshplan's
leaf blocks (nn.Embedding, RMSNorm, Attention, MoE/FeedForward, OutputHead) whose parameters ARE the HF model's
Parameter objects: nothing is copied, a backward through the front door fills hf_model's .grad, and a plan's
shards are cut from the HF weights. `hf_names` maps each front-door parameter name to the HF one.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from .checks import HFConfigError


class DecoderBlock(nn.Module):
    """Pre-norm residual block, as every supported family's decoder layer computes it."""

    def __init__(self, attention_norm: nn.Module, attention: nn.Module, ffn_norm: nn.Module, feed_forward: nn.Module):
        super().__init__()
        self.attention_norm, self.attention = attention_norm, attention
        self.ffn_norm, self.feed_forward = ffn_norm, feed_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class CausalLM(nn.Module):
    """tokens [B, S] -> logits [B, S, V] over an HF model's parameters (meshplan.hf.adapt builds it)."""

    def __init__(self, embedding: nn.Embedding, layers: list[DecoderBlock], norm: nn.Module, output: nn.Module,
                 hf_model: nn.Module, max_seq_len: int):
        super().__init__()
        self.tok_embeddings, self.layers, self.norm, self.output = embedding, nn.ModuleList(layers), norm, output
        object.__setattr__(self, "hf_model", hf_model)  # not a submodule: its parameters are already ours
        self.max_seq_len = max_seq_len
        # what compile() reads for its default example length (planning a 128k-context model at 4k by default)
        self.config = SimpleNamespace(max_seq_len=min(max_seq_len, 4096), hf=hf_model.config,
                                      name=getattr(hf_model.config, "model_type", type(hf_model).__name__))
        self.hf_names = _hf_names(self, hf_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def _hf_names(front: nn.Module, hf_model: nn.Module) -> dict[str, str]:
    """front-door parameter name -> HF parameter name; every HF parameter must be used, or the adapter would
    silently drop part of the model's math."""
    hf_by_id = {id(p): n for n, p in hf_model.named_parameters()}
    names = {n: hf_by_id.get(id(p)) for n, p in front.named_parameters()}
    foreign = [n for n, h in names.items() if h is None]
    if foreign:
        raise RuntimeError(f"meshplan.hf: front-door parameters {foreign} are not the HF model's")
    unused = sorted(set(hf_by_id.values()) - set(names.values()))
    if unused:
        raise HFConfigError(f"{type(hf_model).__name__}: parameters {unused[:4]} are not used by meshplan's "
                                  f"adapter (a variant it does not implement)")
    return names
