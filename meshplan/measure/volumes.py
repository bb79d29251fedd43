"""Closed-form bytes per rank for attention and MoE strategies, and the bytes the runtime actually sends.

Formulas count what one rank SENDS per layer in the forward pass (the backward sends the same again: every
collective's backward is a collective of the same size), with n ranks on the model axis, b sequences of length s
on this rank's data-parallel shard, hidden h, Hq query / Hkv KV heads of size hd, and e bytes per element:

  attention tp  (all-gather [b, s/n, h] in, reduce-scatter [b, s, h] out):     2·b·s·h·(n-1)/n · e          (V_TP)
  attention sp  (all-to-all q/k/v [b, s/n, (Hq+2Hkv')·hd], all-to-all out [b, s, Hq/n·hd]):
                b·s·hd·(n-1)/n · (Hq + 2·Hkv' + Hq)/n · e = V_TP·(2 + 2/m)/(2n) if Hkv' = Hkv   (V_SP, sends)
                where Hkv' = max(Hkv, n): with fewer KV heads than ranks each rank receives its own copy
  MoE tp        as attention tp                                                                       (V_TP)
  MoE ep        dispatch of the rows this rank routes to other ranks' experts, combine of the rows other ranks
                routed to its experts: (rows_sent + rows_received)·h·e, plus the token counts ((n-1)·E/n int64);
                under uniform routing both are k·b·(s/n)·(n-1)/n rows: 2·(k/n)·b·s·h·(n-1)/n·e        (V_EP)
"""
from __future__ import annotations

import torch

from ..ir import Mesh, trace
from ..ir.plan import Plan
from ..models import ModelConfig, build_model, load_config, route
from ..runtime.comm_stats import BWD, FWD, GRAD, CommStats
from ..runtime.executor import ParallelModel
from ..runtime.local_world import LocalWorld


def attention_bytes(strategy: str, cfg: ModelConfig, b: int, s: int, n: int, elem: int = 4) -> int:
    """Bytes one rank sends for one attention layer's forward (its edges included)."""
    h, hd = cfg.dim, cfg.head_dim
    if n == 1 or strategy == "replicate":
        return 0
    if strategy == "tp":
        return 2 * b * s * h * (n - 1) // n * elem
    if strategy == "sp":
        kv = max(cfg.n_kv_heads, n) if cfg.n_kv_heads % n else cfg.n_kv_heads
        qkv = b * (s // n) * (cfg.n_heads + 2 * kv) * hd * (n - 1) // n
        out = b * s * (cfg.n_heads // n) * hd * (n - 1) // n
        return (qkv + out) * elem
    raise ValueError(strategy)


def moe_tp_bytes(cfg: ModelConfig, b: int, s: int, n: int, elem: int = 4) -> int:
    return 2 * b * s * cfg.dim * (n - 1) // n * elem if n > 1 else 0


def moe_ep_bytes(rows_sent: int, rows_received: int, cfg: ModelConfig, elem: int = 4) -> int:
    """Dispatch (the rows this rank sends off-rank) + combine (the rows it received, sent back), forward."""
    return (rows_sent + rows_received) * cfg.dim * elem


def ep_counts_bytes(cfg: ModelConfig, n: int) -> int:
    return (n - 1) * (cfg.n_experts // n) * 8


@torch.no_grad()
def routed_rows(model, tokens: torch.Tensor, n: int) -> list[list[tuple[int, int]]]:
    """Per MoE layer, per rank of a sequence-sharded EP axis of n ranks: (rows it sends to experts on other
    ranks, rows it receives from other ranks for its experts), from the single-device routing (dropless)."""
    records: list[torch.Tensor] = []
    hooks = []
    for layer in model.layers:
        moe = layer.feed_forward
        if hasattr(moe, "gate"):
            hooks.append(moe.gate.register_forward_hook(
                lambda mod, inp, out, moe=moe: records.append(route(out, moe.top_k, moe.norm_topk_prob)[1])))
    model(tokens)
    for h in hooks:
        h.remove()
    b, s = tokens.shape
    out = []
    for idx in records:
        per_rank_experts = model.config.n_experts // n
        owner = (idx // per_rank_experts).view(b, s, -1)
        rows = []
        for r in range(n):
            mine = owner[:, r * s // n:(r + 1) * s // n]
            others = torch.cat([owner[:, :r * s // n], owner[:, (r + 1) * s // n:]], dim=1)
            rows.append((int((mine != r).sum()), int((others == r).sum())))
        out.append(rows)
    return out


def split_bytes(stats: CommStats, phases=(FWD, BWD)) -> dict[str, int]:
    """A step's bytes by the part of the model they serve: attention (the op and the edges in and out of it),
    ffn (likewise), other activations (embedding, head, the output gather), and gradient reduction."""
    parts = {"attention": 0, "ffn": 0, "other": 0, "grads": 0}
    for k, v in stats.bytes.items():
        if k.phase == GRAD:
            parts["grads"] += v
        elif k.phase not in phases:
            continue
        elif k.op.endswith(".attention") or (k.op.endswith(".add") and k.tag == "in1"):
            parts["attention"] += v
        elif k.op.endswith(".feed_forward") or (k.op.endswith(".add_1") and k.tag == "in1"):
            parts["ffn"] += v
        else:
            parts["other"] += v
    return parts


def measure_bytes(config: str | ModelConfig = "tiny", n: int = 2, batch: int = 4, seq: int = 16,
                  attention=("sp", "tp"), ffn=("ep", "tp")) -> dict[str, dict]:
    """Bytes rank 0 sends in one training step (forward + backward + gradient reduction) on a mesh of n ranks, for
    each attention x FFN strategy pair, next to the closed forms (per step = 2 x forward, summed over layers)."""
    cfg = load_config(config) if isinstance(config, str) else config
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    graph = trace(build_model(cfg))
    mesh = Mesh.of(mp=n)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    rows = routed_rows(build_model(cfg), tokens, n)
    results = {}
    for att in attention:
        for moe in ffn:
            plan = Plan.build(graph, mesh, {"attention": att, "moe": moe})
            world = LocalWorld(n)
            groups = world.groups(mesh)

            def step(r, plan=plan):
                pm = ParallelModel(build_model(cfg), plan, graph=graph, groups=groups[r])
                pm(tokens).float().pow(2).mean().backward()
                pm.reduce_gradients()
                return split_bytes(pm.comm_stats)

            measured = world.run(step)[0]
            if moe == "ep":
                ffn_formula = sum(2 * moe_ep_bytes(*layer[0], cfg) + ep_counts_bytes(cfg, n) for layer in rows)
            else:
                ffn_formula = 2 * n_moe * moe_tp_bytes(cfg, batch, seq, n)
            results[f"{att}/{moe}"] = {
                "measured": measured,
                "formula": {"attention": 2 * cfg.n_layers * attention_bytes(att, cfg, batch, seq, n),
                            "ffn": ffn_formula},
            }
    return results
