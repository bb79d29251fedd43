"""Router load imbalance, measured on the reference router (meshplan/models/moe_transformer.py:route) with random
weights: max/mean routed rows over the n ranks that split the experts (what EP compute and all-to-all pay: the most
loaded rank sets the time), and max/mean rows per expert, for each model's (dim, experts, top-k) and a micro-batch of
tokens. Compared with the planner's closed form (cost_model.ep_imbalance): 1 + sqrt(2 ln n · (n - 1) / (k · t)).

Method: gate weights ~ N(0, 0.02²) (the model's init_weights), inputs ~ N(0, 1) per feature (what an RMS-normed
hidden state looks like), `trials` independent draws; reported: the mean over trials of max/mean, and its spread.
Trained routers are not measured here (no trained weights are shipped): a balancing loss keeps a trained router
near this, but not at it -- see docs/reference.md#router-imbalance.

    python benchmarks/router_imbalance.py [--trials 8]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, machine  # noqa: E402
from meshplan.models.moe_transformer import route  # noqa: E402
from meshplan.table import format_table  # noqa: E402

# name, dim, experts, top-k, tokens per micro-batch and EP group, EP ranks
CASES = [("internal-352b", 4096, 32, 3, 8192, 8), ("mixtral-8x7b", 4096, 8, 2, 4096, 8),
         ("deepseek-v3", 7168, 256, 8, 4096, 8), ("qwen3-235b-a22b", 4096, 128, 8, 4096, 8),
         ("gpt-oss-120b", 2880, 128, 4, 4096, 8)]


def closed_form(k: int, t: int, n: int) -> float:
    """cost_model.ep_imbalance at numbers."""
    return 1 + math.sqrt(2 * math.log(n) * (n - 1) / (k * t)) if n > 1 else 1.0


def measure(dim: int, experts: int, k: int, tokens: int, ranks: int, trials: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    per_rank, per_expert = [], []
    for _ in range(trials):
        w = torch.randn(experts, dim, generator=g) * 0.02
        x = torch.randn(tokens, dim, generator=g)
        _, idx = route(x @ w.T, k, True)
        counts = torch.bincount(idx.reshape(-1), minlength=experts).float()
        rank = counts.view(ranks, experts // ranks).sum(1)
        per_rank.append((rank.max() / rank.mean()).item())
        per_expert.append((counts.max() / counts.mean()).item())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"rank_max_over_mean": mean(per_rank), "rank_spread": [min(per_rank), max(per_rank)],
            "expert_max_over_mean": mean(per_expert), "expert_spread": [min(per_expert), max(per_expert)],
            "closed_form": closed_form(k, tokens, ranks)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    args = ap.parse_args(argv)
    start, rows, out = time.time(), [], []
    for name, dim, e, k, t, n in CASES:
        r = measure(dim, e, k, t, n, args.trials)
        out.append({"model": name, "dim": dim, "experts": e, "top_k": k, "tokens": t, "ranks": n, **r})
        rows.append([name, f"{e}/{k}", t, n, f"{r['rank_max_over_mean']:.4f}", f"{r['closed_form']:.4f}",
                     f"{r['expert_max_over_mean']:.3f}"])
    print(format_table(["model", "experts/top-k", "tokens", "EP ranks", "rank max/mean", "closed form",
                        "expert max/mean"], rows, align="llrrrrr"))
    import json
    doc = {"benchmark": "router_imbalance", "machine": machine(), "trials": args.trials, "method": __doc__.split(
        "Method: ")[1].split("\n\n")[0].replace("\n", " "), "wall_s": time.time() - start, "rows": out}
    (RESULTS / "router_imbalance.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
