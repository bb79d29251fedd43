"""Training throughput on this machine: the plan meshplan.compile picks vs the Megatron-style plan vs eager
single-process PyTorch, same model (configs/models/small.yaml), same global batch, tokens/s.

- compiled: every rank calls `meshplan.compile(model, cluster="local", example_inputs=...)` (plan="auto": the
  planner's choice for the world) on an initialised gloo world, and trains the returned module.
- megatron: planner/baselines.py's Megatron-LM plan for the small world (TP attention + TP experts + TP dense FFN
  on the model axis with sequence-parallel norms/residuals, vocab-parallel embedding, bf16 activation collectives
  and gradients, DP outer; pp = 1 since the runtime runs no pipeline stages), run through the same compile().
- eager: the unmodified model in this (parent) process, all of torch's CPU threads; eager_1t: the same with one
  thread (what each spawned rank gets: launch.spawn sets cpu_count // world threads, at least 1). On a loaded
  2-core machine the multi-threaded eager step is very noisy (OpenMP threads wait on each other), hence both.

One round = one spawn of W gloo ranks that warms up both distributed plans, then times `--steps` steps of each,
alternating compiled/megatron step by step; then `--steps` eager steps in the parent. `--rounds` rounds. A step
(forward, cross-entropy, backward, gradient reduction, AdamW) is timed on every rank after a barrier; its time is
the slowest rank's. Reported: median step time per system over all rounds, tokens/s = batch*seq/median, ratios.

    python benchmarks/throughput.py [--quick] [--world 4] [--rounds 3] [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, print_table, rel, write_json  # noqa: E402

SYSTEMS = ("compiled", "megatron", "eager_1t", "eager")


def megatron_plan(graph, cluster, world: int, batch: int, seq: int):
    from meshplan.planner import Options
    from meshplan.planner.baselines import baseline

    return baseline("megatron", graph, cluster, world, batch, Options(seq=seq), pp=1).plan


def _batch(model_name: str, batch: int, seq: int):
    import torch

    from meshplan.models import load_config

    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, load_config(model_name).vocab_size, (batch, seq + 1), generator=gen)
    return data[:, :-1], data[:, 1:]


def _step_fn(module, tokens, targets, reduce=None):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step():
        loss = F.cross_entropy(module(tokens).flatten(0, 1).float(), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if reduce is not None:
            reduce()
        opt.step()
    return step


def _rank_main(rank: int, world: int, model_name: str, megatron_yaml: str, batch: int, seq: int, warmup: int,
               steps: int, result: str) -> None:
    import torch.distributed as dist
    import yaml

    import meshplan
    from meshplan.ir import Plan
    from meshplan.models import build_model, load_config

    tokens, targets = _batch(model_name, batch, seq)
    cfg = load_config(model_name)
    compiled = meshplan.compile(build_model(cfg, seed=0), cluster="local", example_inputs=(tokens,))
    mega = meshplan.compile(build_model(cfg, seed=0), cluster="local", example_inputs=(tokens,),
                            plan=Plan.from_dict(yaml.safe_load(megatron_yaml)))
    fns = {"compiled": _step_fn(compiled, tokens, targets, compiled.reduce_gradients),
           "megatron": _step_fn(mega, tokens, targets, mega.reduce_gradients)}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {n: [] for n in fns}
    for i in range(steps):
        for n in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            dist.barrier()
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    everyone = [None] * world
    dist.all_gather_object(everyone, times)
    if rank == 0:
        slowest = {n: [max(r[n][i] for r in everyone) for i in range(steps)] for n in times}
        Path(result).write_text(json.dumps({"times": slowest, "compiled_plan": compiled.plan.summary(),
                                            "compiled_plan_yaml": compiled.plan.to_yaml()}))


def run(model_name: str = "small", world: int = 4, batch: int = 8, seq: int = 128, rounds: int = 3,
        steps: int = 5, warmup: int = 2, write: bool = True, quick: bool = False) -> dict:
    import torch

    from meshplan.ir import trace
    from meshplan.models import build_model, load_config
    from meshplan.planner import load_cluster
    from meshplan.runtime.launch import spawn

    cluster = load_cluster("local")
    cfg = load_config(model_name)
    tokens, targets = _batch(model_name, batch, seq)
    graph = trace(build_model(cfg, seed=0), (tokens,))
    mega = megatron_plan(graph, cluster, world, batch, seq)
    threads = torch.get_num_threads()
    eager_fns = {"eager_1t": (1, _step_fn(build_model(cfg, seed=0), tokens, targets)),
                 "eager": (threads, _step_fn(build_model(cfg, seed=0), tokens, targets))}
    for nt, fn in eager_fns.values():
        torch.set_num_threads(nt)
        for _ in range(warmup):
            fn()
    samples = {n: [] for n in SYSTEMS}
    info = {}
    t0 = time.perf_counter()
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "times.json"
            spawn(world, _rank_main, model_name, mega.to_yaml(), batch, seq, warmup, steps, str(out),
                  timeout_s=600.0)
            info = json.loads(out.read_text())
        for n, ts in info["times"].items():
            samples[n] += ts
        for i in range(steps):
            for n in (list(eager_fns) if i % 2 == 0 else list(eager_fns)[::-1]):
                nt, fn = eager_fns[n]
                torch.set_num_threads(nt)
                t = time.perf_counter()
                fn()
                samples[n].append(time.perf_counter() - t)
        torch.set_num_threads(threads)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {median(samples[n]) * 1e3:.0f} ms" for n in SYSTEMS),
              flush=True)
    tokens_per_step = batch * seq
    res = {n: {"median_step_s": median(s), "tokens_per_s": tokens_per_step / median(s), "samples_s": s}
           for n, s in samples.items()}
    ratios = {"compiled_over_megatron": res["compiled"]["tokens_per_s"] / res["megatron"]["tokens_per_s"],
              "compiled_over_eager": res["compiled"]["tokens_per_s"] / res["eager"]["tokens_per_s"],
              "megatron_over_eager": res["megatron"]["tokens_per_s"] / res["eager"]["tokens_per_s"],
              "compiled_over_eager_1t": res["compiled"]["tokens_per_s"] / res["eager_1t"]["tokens_per_s"],
              "megatron_over_eager_1t": res["megatron"]["tokens_per_s"] / res["eager_1t"]["tokens_per_s"]}
    out = {"model": model_name, "world": world, "global_batch": batch, "seq": seq, "rounds": rounds,
           "steps_per_round": steps, "warmup": warmup, "quick": quick, "torch_threads_eager": threads,
           "compiled_plan": info.get("compiled_plan"), "compiled_plan_yaml": info.get("compiled_plan_yaml"),
           "megatron_plan": mega.summary(), "results": res, "ratios": ratios, "wall_s": time.perf_counter() - t0}
    report(out)
    if write:
        print(f"wrote {rel(write_json('throughput', out))}")
    return out


def report(out: dict) -> None:
    rows = []
    base = out["results"]["eager_1t"]["tokens_per_s"]
    desc = {"compiled": f"meshplan.compile auto, {out['world']} gloo ranks",
            "megatron": f"Megatron-style (TP+SP), {out['world']} gloo ranks",
            "eager_1t": "eager, 1 process, 1 thread",
            "eager": f"eager, 1 process, {out['torch_threads_eager']} threads"}
    for n in SYSTEMS:
        r = out["results"][n]
        rows.append([n, desc[n], f"{r['median_step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['tokens_per_s'] / base:.2f}x", len(r["samples_s"])])
    print_table(["system", "what", "median step ms", "tokens/s", "vs eager_1t", "steps"], rows, align="llrrrr",
                title=f"\nthroughput: {out['model']}, global batch {out['global_batch']} x seq {out['seq']}")
    r = out["ratios"]
    print(f"compiled / megatron tokens/s: {r['compiled_over_megatron']:.2f}x; compiled / eager (all threads): "
          f"{r['compiled_over_eager']:.2f}x; compiled plan: "
          f"{(out['compiled_plan'] or '').splitlines()[0] if out['compiled_plan'] else '-'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 ranks, 1 round of 2 steps")
    ap.add_argument("--model", default="small")
    ap.add_argument("--world", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args(argv)
    run(a.model, a.world or (2 if a.quick else 4), a.batch, a.seq, a.rounds or (1 if a.quick else 3),
        a.steps or (2 if a.quick else 5), warmup=1 if a.quick else 2, quick=a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
