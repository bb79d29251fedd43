"""Meta-device models: each rank allocates only its shards, then fills them from a weight source.

    model = build_model(cfg, device="meta")                          # no memory for the parameters
    pm = ParallelModel(model, plan, init=seeded_init(model, seed=0))  # every rank: its shards only
    pm = ParallelModel(model, plan, init="ckpt/step_000010")          # or: a DCP checkpoint (checkpoint.py)

A weight source is a DCP checkpoint directory or a function yielding (name, full tensor), one parameter at a
time, in any order; each rank keeps the slice its placements give it and drops the rest, so no rank holds more
than one full parameter at a time. seeded_init yields what build_model(cfg, seed=seed) holds, bit for bit (the
same generator drawn in the same order), so a meta-built ParallelModel computes what the materialised one does.

Buffers (RoPE tables) are not parameters: a meta buffer of a known module is recomputed in full (they are small);
any other meta buffer is an error naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..ir.placement import Shard
from .device_mesh import local_tensor

WeightSource = Callable[[], Iterator[tuple[str, torch.Tensor]]] | str | Path


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def seeded_init(model: nn.Module, seed: int = 0, std: float = 0.02) -> Callable[[], Iterator]:
    """The weight source of meshplan's own models (moe_transformer.init_values): build_model's seeded values."""
    from ..models.moe_transformer import init_values

    return lambda: init_values(model.named_parameters(), seed, std)


def real_buffers(model: nn.Module) -> None:
    """Replace the meta buffers of `model` with their real values, computed in full on this rank."""
    from ..models.mla import MLAttention
    from ..models.moe_transformer import Attention, rope_tables

    for mname, module in model.named_modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if isinstance(module, Attention):
            cos, sin = rope_tables(module.head_dim, module.rope_cos.shape[0], module.rope_theta)
        elif isinstance(module, MLAttention):  # placeholders of zeros, as its __init__ makes them
            cos, sin = torch.zeros(module.rope_cos.shape), torch.zeros(module.rope_sin.shape)
        else:
            raise ValueError(f"model: buffer {mname}.{meta[0]} is on the meta device and meshplan cannot recompute "
                             f"it; build the model with real buffers (only parameters may be meta)")
        module.rope_cos, module.rope_sin = cos.to(module.rope_cos.dtype), sin.to(module.rope_sin.dtype)


def local_slice(full: torch.Tensor, placement, axes) -> torch.Tensor:
    """This rank's shard of `full` under `placement` (the executor's chunking: one mesh axis after another)."""
    for g, pl in zip(axes, placement):
        if isinstance(pl, Shard) and g.size > 1:
            full = full.chunk(g.size, pl.dim)[g.index]
    return full


@torch.no_grad()
def fill(pm, source: WeightSource) -> None:
    """Fill pm's shards (allocated, uninitialised: the DTensor parameters' local tensors) from `source`. Every
    shard must be written exactly once."""
    if isinstance(source, str | Path):
        from .checkpoint import load

        load(pm, None, source)
        return
    local = dict(pm.named_parameters())
    written: set[str] = set()
    for name, full in source():
        cname = pm._aliases.get(name, name)
        if cname not in local or cname in written:
            continue  # a parameter of another pipeline stage, or a tied weight's second name
        if tuple(full.shape) != pm.full_shape(cname):
            raise ValueError(f"init: parameter {name!r} has shape {tuple(full.shape)}, the model's is "
                             f"{pm.full_shape(cname)}")
        local_tensor(local[cname]).copy_(local_slice(full, pm.placement_of(cname), pm.axes))
        written.add(cname)
    missing = sorted(set(local) - written)
    if missing:
        raise ValueError(f"init: the weight source gave no value for {len(missing)} parameters, e.g. {missing[0]!r}")
