"""Plan an HF model from its config.json alone: build it on the meta device (no weights, no memory), adapt it,
trace it. What `meshplan trace|plan|simulate path/to/config.json` run."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checks import HFConfigError


def load_config(path: str | Path):
    """The transformers config of a config.json file (or a directory holding one)."""
    import transformers

    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such HF config.json")
    d = json.loads(p.read_text())
    if "model_type" not in d:
        raise HFConfigError(f"{p}: model_type: missing (an HF config.json names its model_type)")
    return transformers.AutoConfig.for_model(**d)


def name_of(path: str | Path) -> str:
    p = Path(path)
    return (p if p.is_dir() else p.parent).name or p.stem


def meta_model(path: str | Path, max_seq_len: int | None = None):
    """The front door (meshplan.hf.adapt) of the HF causal LM that config.json describes, on the meta device, in
    the config's dtype."""
    import transformers

    from . import adapt

    config = load_config(path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    front = adapt(model, max_seq_len)
    front.config.name = name_of(path)
    return front


def trace_config(path: str | Path, max_seq_len: int | None = None):
    """(graph, front-door config) for the planner: the config has max_seq_len (the default sequence length)."""
    from ..ir import trace

    front = meta_model(path, max_seq_len)
    return trace(front), front.config
