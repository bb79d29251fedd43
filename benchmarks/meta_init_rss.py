"""Peak memory of a meta-built model on 4 gloo ranks (expert parallel) vs the same model in one process.

    .venv/bin/python benchmarks/meta_init_rss.py [--model moe-1b] [--world 4] [--steps 2] [--quick]

The single-process run builds the model materialised (build_model(cfg, seed)) and trains it; each rank builds
it on the meta device and fills only its shards from materialize.seeded_init (the same values), under an EP
plan (attention sp, MoE ep on one model axis of --world ranks). Both train --steps steps of SGD (no optimizer
state: AdamW's two moments would not fit the single-process run of ~1B parameters on a 23 GB machine shared by
others) on the same global batches, and report resource.getrusage's ru_maxrss in each process, measured in a
fresh process each so nothing is inherited. Writes benchmarks/results/meta_init_rss.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import RESULTS, machine  # noqa: E402

LR = 1e-3


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _batch(cfg, step: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def single(cfg_name: str, steps: int, batch: int, seq: int, out: str) -> None:
    """One process, the materialised model, plain PyTorch."""
    from meshplan.models import build_model, load_config

    torch.set_num_threads(2)
    cfg = load_config(cfg_name)
    base = _peak_mb()
    start = time.perf_counter()
    model = build_model(cfg, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        tokens, targets = _batch(cfg, step, batch, seq)
        loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    Path(out).write_text(json.dumps({"peak_rss_mb": _peak_mb(), "rss_after_import_mb": base, "losses": losses,
                                     "params": sum(p.numel() for p in model.parameters()),
                                     "seconds": time.perf_counter() - start}))


def rank_worker(rank: int, world: int, cfg_name: str, steps: int, batch: int, seq: int, outdir: str) -> None:
    """One rank: the model on meta, this rank's shards filled from the seeded values, an EP plan."""
    from meshplan.ir import Mesh, Plan, trace
    from meshplan.models import build_model, load_config
    from meshplan.runtime import ParallelModel
    from meshplan.runtime.device_mesh import local_tensor
    from meshplan.runtime.materialize import seeded_init

    torch.set_num_threads(1)
    cfg = load_config(cfg_name)
    base = _peak_mb()
    start = time.perf_counter()
    meta = build_model(cfg, device="meta")
    plan = Plan.build(trace(meta), Mesh.of(mp=world), {"attention": "sp", "moe": "ep"}, axis="mp")
    pm = ParallelModel(meta, plan, timeout_s=600, init=seeded_init(meta, seed=0))
    after_init = _peak_mb()
    opt = torch.optim.SGD(pm.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        tokens, targets = _batch(cfg, step, batch, seq)
        opt.zero_grad(set_to_none=True)
        loss = pm.loss(tokens, targets)
        loss.backward()
        pm.reduce_gradients()
        opt.step()
        losses.append(loss.item())
    Path(outdir, f"rank{rank}.json").write_text(json.dumps({
        "peak_rss_mb": _peak_mb(), "rss_after_import_mb": base, "peak_after_init_mb": after_init, "losses": losses,
        "local_params": sum(local_tensor(p).numel() for p in pm.parameters()), "seconds": time.perf_counter() - start}))


def main() -> None:
    from meshplan.runtime.launch import spawn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="moe-1b")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="the `small` model (seconds; for a smoke run)")
    args = p.parse_args()
    model = "small" if args.quick else args.model
    with tempfile.TemporaryDirectory() as tmp:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=single, args=(model, args.steps, args.batch, args.seq, f"{tmp}/single.json"))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"the single-process run failed (exit code {proc.exitcode})")
        one = json.loads(Path(tmp, "single.json").read_text())
        spawn(args.world, rank_worker, model, args.steps, args.batch, args.seq, tmp, timeout_s=1200)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
    worst = max(r["peak_rss_mb"] for r in ranks)
    result = {"model": model, "params": one["params"], "world": args.world, "plan": "attention sp, moe ep",
              "optimizer": "SGD", "steps": args.steps, "batch": args.batch, "seq": args.seq, "single": one,
              "ranks": ranks, "max_rank_peak_over_single": worst / one["peak_rss_mb"], "quick": args.quick,
              "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "meta_init_rss.json").write_text(json.dumps(result, indent=1) + "\n")
    peaks = ", ".join(f"{r['peak_rss_mb']:,.0f}" for r in ranks)
    print(f"{model} ({one['params'] / 1e9:.2f}B parameters), {args.steps} steps: one process peak "
          f"{one['peak_rss_mb']:,.0f} MB; {args.world} meta-built EP ranks peak {peaks} MB "
          f"(max {100 * worst / one['peak_rss_mb']:.1f}% of one process); losses {one['losses']} vs "
          f"{ranks[0]['losses']}")


if __name__ == "__main__":
    main()
