"""Load an HF safetensors checkpoint into this rank's shards, never holding the full model.

    front = empty_model(config)                        # parameters of full shape but no memory (stride 0)
    pm = ParallelModel(front, plan, graph, ...)        # allocates only this rank's shards (and replicated ones)
    load_shards(pm, front, "path/to/checkpoint")       # reads just those slices (safetensors get_slice)

Checkpoints on the Hub (and transformers' save_pretrained) keep one tensor per expert; transformers 5 fuses them
when it loads. Here each rank reads the experts and rows it holds and fuses them itself: gate_up_proj[e] is
[gate_e; up_e] (rows), down_proj[e] is down_e. Mixtral's checkpoints name the MoE block `block_sparse_moe` and
its experts w1 (gate), w3 (up), w2 (down); the other families `mlp` and gate_proj/up_proj/down_proj.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..runtime.device_mesh import local_tensor

_EXPERTS = re.compile(r"^(?P<layer>model\.layers\.\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")


def empty_model(config, max_seq_len: int | None = None, dtype: torch.dtype | None = None):
    """The front door (meshplan.hf.adapt) of `config`'s causal LM whose parameters take no memory: each is a
    stride-0 view of one element, of its full shape. RoPE tables are computed for real (they are not in
    checkpoints); other buffers are zeros until load_shards fills them."""
    import transformers

    from . import adapt

    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    placeholders: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in placeholders:
                    empty = torch.empty((), dtype=p.dtype).expand(p.shape)
                    placeholders[id(p)] = nn.Parameter(empty, requires_grad=p.requires_grad)
                module._parameters[name] = placeholders[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return adapt(model, max_seq_len)


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file, a directory, or a sharded one with its index), opened
    lazily: get(name, slices) reads only that slice."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        p = Path(path)
        if p.is_dir():
            index = p / "model.safetensors.index.json"
            files = sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()}) \
                if index.exists() else sorted(p.glob("*.safetensors"))
        else:
            files = [p]
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors files")
        self._handles = [safe_open(str(f), "pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, slices: tuple[slice, ...] = ()) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"checkpoint: no tensor {name!r}")
        return self._where[name].get_slice(name)[slices] if slices else self._where[name].get_tensor(name)


def local_slices(pm, name: str, shape: torch.Size) -> tuple[slice, ...]:
    """The region of the full tensor `name` that this rank's shard holds (the executor's chunking, in order)."""
    lo, size = [0] * len(shape), list(shape)
    for group, placement in zip(pm.axes, pm.placement_of(name)):
        dim = getattr(placement, "dim", None)
        if dim is not None and group.size > 1:
            size[dim] //= group.size
            lo[dim] += group.index * size[dim]
    return tuple(slice(a, a + n) for a, n in zip(lo, size))


def _expert_keys(model_type: str, layer: str, e: int) -> tuple[str, str, str]:
    if model_type == "mixtral":
        base = f"{layer}.block_sparse_moe.experts.{e}"
        return f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"
    base = f"{layer}.mlp.experts.{e}"
    return f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"


def _disk_name(model_type: str, hf_name: str) -> str:
    if model_type == "mixtral":
        return re.sub(r"^(model\.layers\.\d+)\.mlp\.gate\.", r"\1.block_sparse_moe.gate.", hf_name)
    return hf_name


def _read(ck: Checkpoint, model_type: str, hf_name: str, full: torch.Size, where: tuple[slice, ...]):
    m = _EXPERTS.match(hf_name)
    if hf_name in ck or m is None:
        return ck.get(hf_name if hf_name in ck else _disk_name(model_type, hf_name), where)
    experts, rows, cols = where
    rows_full = full[1] // 2 if m["kind"] == "gate_up_proj" else full[1]
    out = []
    for e in range(experts.start, experts.stop):
        gate, up, down = _expert_keys(model_type, m["layer"], e)
        if m["kind"] == "down_proj":
            out.append(ck.get(down, (rows, cols)))
            continue
        # this rank's rows of [gate; up]: under MoE tp w13 is whole (sharding.py), so rows spans both halves
        parts = [ck.get(gate, (slice(max(rows.start, 0), min(rows.stop, rows_full)), cols)),
                 ck.get(up, (slice(max(rows.start - rows_full, 0), max(rows.stop - rows_full, 0)), cols))]
        out.append(torch.cat([t for t in parts if t.shape[0]]))
    return torch.stack(out)


@torch.no_grad()
def load_shards(pm, front: nn.Module, path: str | Path) -> None:
    """Fill every shard `pm` (a ParallelModel over `front`) holds, and the front door's persistent buffers, from
    the checkpoint at `path`, reading only this rank's slices."""
    ck = Checkpoint(path)
    hf = front.hf_model
    model_type = hf.config.model_type
    full_shapes = {n: p.shape for n, p in front.named_parameters()}
    for name, param in pm.named_parameters():
        shard = local_tensor(param)  # this rank's part of the DTensor parameter
        where = local_slices(pm, name, full_shapes[name])
        t = _read(ck, model_type, front.hf_names[name], full_shapes[name], where)
        if tuple(t.shape) != tuple(shard.shape):
            raise RuntimeError(f"checkpoint {front.hf_names[name]}: read {tuple(t.shape)} for a shard of "
                               f"{tuple(shard.shape)}")
        shard.copy_(t.to(shard.dtype))
    persistent = hf.state_dict()
    by_id = {id(t): n for n, t in hf.named_buffers()}
    for _, buf in front.named_buffers():
        hf_name = by_id.get(id(buf))
        if hf_name in persistent:
            buf.copy_(ck.get(_disk_name(model_type, hf_name)).to(buf.dtype))
