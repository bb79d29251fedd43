"""RoPE tables from an HF model's own rotary embedding module, so its rope scaling (linear, llama3, YaRN's
attention factor) is reproduced exactly rather than re-derived."""
from __future__ import annotations

import torch
import torch.nn as nn

from .checks import HFConfigError

# rope types whose angles do not depend on the sequence length of the call (dynamic NTK and LongRoPE rescale
# with it, so one table cannot serve every length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_tables(rotary: nn.Module, max_seq_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, rot_dim/2] in float32 for positions 0..max_seq_len-1. HF's tables are
    cat(freqs, freqs) over the rotary dims; meshplan's hold each angle once."""
    pos = torch.arange(max_seq_len, device=device)[None]
    cos, sin = rotary(torch.empty(0, dtype=torch.float32, device=device), pos)
    cos, sin = cos[0].float(), sin[0].float()
    half = cos.shape[-1] // 2
    if cos.device.type != "meta" and not (torch.equal(cos[:, :half], cos[:, half:])
                                          and torch.equal(sin[:, :half], sin[:, half:])):
        raise HFConfigError(f"{type(rotary).__name__}: its cos/sin halves differ (not rotate-half RoPE)")
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()
