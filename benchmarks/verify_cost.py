"""What `compile(..., verify=True)` costs, as a multiple of one training step, measured side by side.

On a 2-rank in-process gloo world, every rank times, interleaved (so load drift hits both alike):
  step:   forward + backward + gradient reduction of the compiled model (what training repeats);
  verify: what compile(verify=True) runs: the weight check, the single-device reference step and the compiled
          step on the smallest batch the plan accepts (one sample per data-parallel shard), the gradient check.
Models: the tiny MoE under SP attention + EP MoE, and a nanoGPT (plain torch) under the planner's own plan.
Writes benchmarks/results/verify_cost.json and prints a table.

    python benchmarks/verify_cost.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, print_table, write_json  # noqa: E402

import meshplan  # noqa: E402
from meshplan.ir import Mesh, Plan, trace  # noqa: E402
from meshplan.models import build_model, load_config  # noqa: E402
from meshplan.runtime import LocalWorld, ParallelModel  # noqa: E402
from meshplan.runtime.verify import _loss, small_batch, verify, verify_tokens  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "soundness"))
from user_models import NanoGPT  # noqa: E402


def cases(batch: int, seq: int):
    tiny = build_model(load_config("tiny"), seed=0)
    tokens = torch.zeros(batch, seq, dtype=torch.long)
    yield "tiny MoE, sp+ep, mp=2", tiny, Plan.build(trace(tiny, (tokens,)), Mesh.of(mp=2),
                                                     {"attention": "sp", "moe": "ep"})
    torch.manual_seed(0)
    gpt = NanoGPT(vocab=256, block_size=seq, dim=128, n_head=4, n_layer=4)
    yield "nanoGPT, planner's plan (local)", gpt, meshplan.compile(
        gpt, cluster="local", world_size=2, example_inputs=(tokens,)).plan


def measure(model, plan: Plan, batch: int, seq: int, repeats: int) -> dict:
    graph = trace(model, (torch.zeros(batch, seq, dtype=torch.long),))
    tokens = verify_tokens(graph, torch.zeros(batch, seq, dtype=torch.long))
    small = tokens[:small_batch(plan, graph, batch, seq)]  # what compile(verify=True) checks
    world = LocalWorld(plan.mesh.size, timeout_s=120)
    groups = world.groups(plan.mesh)
    models = [copy.deepcopy(model) for _ in range(plan.mesh.size)]

    def rank(r):
        pm = ParallelModel(models[r], plan, graph, groups=groups[r])

        def step():
            loss = _loss(pm(tokens))
            loss.backward()
            pm.reduce_gradients()
            for p in pm.parameters():
                p.grad = None

        return interleaved({"step": step, "verify": lambda: verify(pm, models[r], graph, small)}, repeats)

    t = world.run(rank)[0]
    return {"step_s": t["step"]["median_s"], "verify_s": t["verify"]["median_s"],
            "ratio": t["verify"]["median_s"] / t["step"]["median_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, model, plan in cases(args.batch, args.seq):
        r = measure(model, plan, args.batch, args.seq, args.repeats)
        rows.append({"case": name, "mesh": str(plan.mesh), **r})
    write_json("verify_cost", {"batch": args.batch, "seq": args.seq,
                                              "repeats": args.repeats, "rows": rows})
    print_table(["case", "mesh", "step ms", "verify ms", "verify / step"],
                [[r["case"], r["mesh"], f"{r['step_s'] * 1e3:.1f}", f"{r['verify_s'] * 1e3:.1f}",
                  f"{r['ratio']:.2f}x"] for r in rows])


if __name__ == "__main__":
    main()
