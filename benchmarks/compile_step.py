"""Step time of ParallelModel(compile=True) vs eager, side by side on CPU (gloo, real processes).

Model "small" (4 layers: 1 dense FFN, 3 MoE), 2 ranks on one model axis, plans:
  sp/ep        Ulysses attention (all-to-alls inside the compiled attention op), expert-parallel MoE (uneven
               all-to-alls whose split sizes are SymInts in the compiled graph);
  tp/tp        Megatron TP attention and FFN, TP MoE (every expert split on its hidden dimension);
  ag_scatter   Ulysses attention, all-gather + local scatter MoE (a data-dependent mask of each rank's rows).
compile=True compiles every op, MoE layers included (runtime/compile.py), fullgraph=True with the default
inductor backend. In each rank, an eager and a compiled ParallelModel of the same weights alternate steps on the
same batches, a new batch (a new routing) every step, so both see the same machine state and the compiled graphs
meet routings they were not traced on. A step is forward + backward + gradient reduction; each number is the
median over REPEATS steps of rank 0's wall time between barriers. "compile (s)" is the wall time of the first
compiled step (the one that traces and compiles every op); "recompiles" counts graphs compiled after it.

    python benchmarks/compile_step.py        # writes benchmarks/results/compile_step.json and prints a table
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from benchmarks.common import timed_step  # noqa: E402
from meshplan.ir import Mesh, Plan, trace  # noqa: E402
from meshplan.models import build_model, load_config  # noqa: E402
from meshplan.runtime import ParallelModel  # noqa: E402
from meshplan.runtime.launch import spawn  # noqa: E402
from meshplan.table import format_table  # noqa: E402

WORLD = 2
MODEL = "small"
BATCH, SEQ = 4, 128
WARMUP, REPEATS = 2, 10
PLANS = {"sp/ep": {"attention": "sp", "moe": "ep"}, "tp/tp": {"attention": "tp", "ffn": "tp", "moe": "tp"},
         "ag_scatter": {"attention": "sp", "moe": "ag_scatter"}}
OUT = ROOT / "benchmarks" / "results" / "compile_step.json"


def worker(rank: int, world: int, plan_yaml: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(MODEL)
    plan = Plan.from_yaml(plan_yaml)
    graph = trace(build_model(cfg, seed=0))
    models = {c: ParallelModel(build_model(cfg, seed=0), plan, graph=graph, timeout_s=900, compile=c)
              for c in (False, True)}
    batches = [torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(i))
               for i in range(1 + WARMUP + REPEATS)]

    def step(pm: ParallelModel, data: torch.Tensor) -> tuple[float, float]:
        _, seconds, loss = timed_step(pm, data[:, :-1], data[:, 1:], time_forward=False)
        return seconds, loss

    compile_s, _ = step(models[True], batches[0])  # traces and compiles every op
    graphs = counters["stats"]["unique_graphs"]
    models[True].comm_stats.reset()  # from here on both run the same steps: their bytes must be equal
    times = {"eager": [], "compiled": [], "loss_eager": [], "loss_compiled": []}
    for i in range(WARMUP + REPEATS):
        for name, c in (("eager", False), ("compiled", True)) if i % 2 else (("compiled", True), ("eager", False)):
            t, loss = step(models[c], batches[1 + i])
            if i >= WARMUP:
                times[name].append(t)
                times[f"loss_{name}"].append(loss)
    stats = {c: (dict(models[c].comm_stats.bytes), dict(models[c].comm_stats.calls)) for c in (False, True)}
    times["bytes_equal"] = stats[False] == stats[True]
    times["compile_s"] = compile_s
    times["graphs"] = graphs  # compiled graphs in this rank (one per op kind and shape, shared by the layers)
    times["recompiles"] = counters["stats"]["unique_graphs"] - graphs  # graphs compiled for later routings
    times["graph_breaks"] = sum(counters["graph_break"].values())
    if rank == 0:
        Path(out_dir, "times.json").write_text(json.dumps(times))


def main() -> None:
    cfg = load_config(MODEL)
    graph = trace(build_model(cfg, device="meta"))
    results = {"model": MODEL, "world": WORLD, "batch": BATCH, "seq": SEQ, "cores": os.cpu_count(),
               "torch": torch.__version__, "backend": "gloo", "compile_backend": "inductor", "repeats": REPEATS,
               "warmup": WARMUP, "load_average_before": os.getloadavg(), "plans": {}}
    rows = []
    for name, strategies in PLANS.items():
        plan = Plan.build(graph, Mesh.of(mp=WORLD), strategies)
        with tempfile.TemporaryDirectory() as tmp:
            spawn(WORLD, worker, plan.to_yaml(), tmp, timeout_s=1800)
            t = json.loads(Path(tmp, "times.json").read_text())
        eager, comp = statistics.median(t["eager"]) * 1e3, statistics.median(t["compiled"]) * 1e3
        results["plans"][name] = {"eager_ms_median": eager, "compiled_ms_median": comp, "speedup": eager / comp,
                                  "eager_ms_min": min(t["eager"]) * 1e3, "compiled_ms_min": min(t["compiled"]) * 1e3,
                                  "compile_s": t["compile_s"], "bytes_equal": t["bytes_equal"],
                                  "graphs": t["graphs"], "recompiles": t["recompiles"],
                                  "graph_breaks": t["graph_breaks"],
                                  "eager_ms": [x * 1e3 for x in t["eager"]],
                                  "compiled_ms": [x * 1e3 for x in t["compiled"]],
                                  "max_loss_diff": max(abs(a - b) for a, b in zip(t["loss_eager"], t["loss_compiled"]))}
        r = results["plans"][name]
        rows.append([name, f"{eager:.1f}", f"{comp:.1f}", f"{eager / comp:.2f}", f"{t['compile_s']:.0f}",
                     f"{r['max_loss_diff']:.1e}", str(t["bytes_equal"]), str(t["graphs"]), str(t["recompiles"])])
    results["load_average_after"] = os.getloadavg()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print(f"{MODEL} model, {WORLD} gloo ranks, batch {BATCH}, seq {SEQ}, {os.cpu_count()} cores; median of "
          f"{REPEATS} steps (forward + backward + gradient reduction)")
    print(format_table(["plan", "eager (ms)", "compiled (ms)", "eager / compiled", "compile (s)", "max |loss diff|",
                        "bytes equal", "graphs", "recompiles"], rows, align="lrrrrrlrr"))
    print(f"load average before/after: {results['load_average_before'][0]:.1f} / "
          f"{results['load_average_after'][0]:.1f} on {os.cpu_count()} cores")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
