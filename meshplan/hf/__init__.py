"""Hugging Face causal LMs in meshplan (the `meshplan[hf]` extra): `adapt(hf_model)` gives a tokens -> logits
module of meshplan's blocks over the HF model's own parameters, which meshplan.compile traces, plans and runs.

    model = MixtralForCausalLM(MixtralConfig(...))
    cm = meshplan.compile(model, strategies={"attention": "sp", "moe": "ep"})   # adapts it itself

Weights without the full model on any rank (checkpoint.py):

    front = empty_model(AutoConfig.from_pretrained(path))    # full shapes, no memory
    cm = meshplan.compile(front, plan=...)                   # under torchrun: allocates this rank's shards only
    load_shards(cm.module, front, path)                      # reads this rank's slices of the safetensors

Supported model types: see ADAPTERS (llama, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3). meshplan's core
never imports transformers; only from_config (a config.json path) does.
"""
from __future__ import annotations

import torch.nn as nn

from .adapters import ADAPTERS, Adapter, register_adapter
from .checkpoint import empty_model, load_shards
from .checks import HFConfigError
from .front_door import CausalLM


def is_hf_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def adapt(model: nn.Module, max_seq_len: int | None = None) -> CausalLM:
    """The front door of an HF causal LM (see front_door.py). max_seq_len: the longest sequence it will run
    (default: config.max_position_embeddings; RoPE tables are built for it)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise HFConfigError(f"{type(model).__name__}: config.model_type={model_type!r} has no meshplan adapter "
                            f"(supported: {', '.join(sorted(ADAPTERS))})")
    if not hasattr(model, "lm_head"):
        raise HFConfigError(f"{type(model).__name__}: meshplan adapts causal LMs (*ForCausalLM, with lm_head)")
    return ADAPTERS[model_type](model, max_seq_len).build()


__all__ = ["ADAPTERS", "Adapter", "CausalLM", "HFConfigError", "adapt", "empty_model", "is_hf_model", "load_shards",
           "register_adapter"]
