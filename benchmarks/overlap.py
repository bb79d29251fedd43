"""Step time of the small MoE model with the emitted overlap program vs the same plan run sequentially.

Real processes (gloo over loopback), worlds of 2 and 4 ranks, plan: Ulysses attention ("sp") and expert-parallel
MoE ("ep") on one model axis of all ranks. In the same processes, steps alternate between the variants so that
they see the same machine state:
  sequential    the executor's straight-line implementations (synchronous collectives, whole batch);
  overlap cC    the module codegen emits for the overlap schedule with C chunks (runtime/overlap.py; c1: the
                async machinery with nothing to overlap, i.e. its overhead alone):
                async all-to-alls issued early, waited on just before first use; in the backward each mirror
                all-to-all is issued where its gradient appears and waited for where autograd needs it.
A step is forward + backward + gradient reduction on the global batch; each number is the median over REPEATS
steps of rank 0's wall time between barriers (forward alone is timed too).

    python benchmarks/overlap.py            # writes benchmarks/results/overlap.json and prints a table
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import timed_step  # noqa: E402
from meshplan.ir import Mesh, Plan, trace  # noqa: E402
from meshplan.models import build_model, load_config  # noqa: E402
from meshplan.runtime import ParallelModel  # noqa: E402
from meshplan.runtime.launch import spawn  # noqa: E402
from meshplan.runtime.overlap import enable_overlap  # noqa: E402
from meshplan.table import format_table  # noqa: E402

WORLDS = (2, 4)
BATCH, SEQ = 4, 128  # small.yaml: a step is ~100-300 ms on 2 CPU cores
CHUNKS = (1, 2, 4)
WARMUP, REPEATS = 2, 15
DURATIONS = "local"  # the calibrated cost model of this machine (configs/clusters/local.yaml)
OUT = ROOT / "benchmarks" / "results" / "overlap.json"


def worker(rank: int, world: int, plan_yaml: str, out_dir: str) -> None:
    torch.manual_seed(0)
    cfg = load_config("small")
    model = build_model(cfg, seed=0)
    graph = trace(model)
    plan = Plan.from_yaml(plan_yaml)
    pm = ParallelModel(model, plan, graph=graph, timeout_s=120)
    data = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    tokens, targets = data[:, :-1], data[:, 1:]
    programs = {"sequential": {}}
    for c in CHUNKS:
        module = enable_overlap(pm, BATCH, SEQ, c, DURATIONS, directory=Path(out_dir, "emitted"))
        programs[f"overlap c{c}"] = dict(module.OPS)
        pm.op_overrides.clear()

    def step(name: str) -> tuple[float, float, float]:
        pm.op_overrides.clear()
        pm.op_overrides.update(programs[name])
        return timed_step(pm, tokens, targets)

    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "step": [], "loss": []} for n in programs}
    for i in range(WARMUP + REPEATS):
        for name in programs:  # interleaved: every variant sees the same drift in machine load
            fwd, total, loss = step(name)
            if i >= WARMUP:
                times[name]["fwd"].append(fwd)
                times[name]["step"].append(total)
                times[name]["loss"].append(loss)
    if rank == 0:
        Path(out_dir, f"world{world}.json").write_text(json.dumps(times))


def main() -> None:
    import tempfile

    torch.set_num_threads(1)
    cfg = load_config("small")
    graph = trace(build_model(cfg, device="meta"))
    results = {"model": "small", "batch": BATCH, "seq": SEQ, "cores": os.cpu_count(), "torch": torch.__version__,
               "load_average_before": os.getloadavg(), "backend": "gloo", "repeats": REPEATS, "warmup": WARMUP,
               "durations": DURATIONS, "worlds": {}}
    rows = []
    for world in WORLDS:
        plan = Plan.build(graph, Mesh.of(mp=world), {"attention": "sp", "moe": "ep"})
        with tempfile.TemporaryDirectory() as tmp:
            spawn(world, worker, plan.to_yaml(), tmp, timeout_s=600)
            times = json.loads(Path(tmp, f"world{world}.json").read_text())
        base = statistics.median(times["sequential"]["step"])
        entry = {}
        for name, t in times.items():
            step_ms, fwd_ms = statistics.median(t["step"]) * 1e3, statistics.median(t["fwd"]) * 1e3
            entry[name] = {"step_ms_median": step_ms, "fwd_ms_median": fwd_ms, "step_ms_min": min(t["step"]) * 1e3,
                           "step_ms": [x * 1e3 for x in t["step"]], "fwd_ms": [x * 1e3 for x in t["fwd"]],
                           "loss": t["loss"][0]}
            rows.append([world, name, f"{fwd_ms:.1f}", f"{step_ms:.1f}", f"{min(t['step']) * 1e3:.1f}",
                         f"{step_ms / (base * 1e3):.3f}",
                         f"{t['loss'][0]:.6f}"])
        results["worlds"][str(world)] = entry
    results["load_average_after"] = os.getloadavg()  # other jobs on the machine make the medians noisy
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print(f"small model, plan sp attention + ep MoE on mp=N, batch {BATCH}, seq {SEQ}, gloo, {os.cpu_count()} cores; "
          f"median of {REPEATS} steps")
    print(format_table(["ranks", "variant", "fwd (ms)", "step (ms)", "min step (ms)", "step / sequential", "loss"],
                       rows, align="llrrrrr"))
    print(f"load average before/after: {results['load_average_before'][0]:.1f} / "
          f"{results['load_average_after'][0]:.1f} on {os.cpu_count()} cores")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
