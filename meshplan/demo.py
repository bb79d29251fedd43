"""`meshplan demo` (what `make demo` runs): the main job on an embedded default, no arguments needed.

1. compile the tiny MoE model for 4 gloo ranks on this machine's calibrated cluster (configs/clusters/local.yaml),
   print the plan, the per-op prediction and the overlap schedule, write the Gantt chart;
2. train it a few dozen steps on 4 real processes and check every step's loss against single-device training;
3. plan internal-352b for 1440 H800 and compare the prediction with the Megatron-style plan.
Each step uses only public entry points, so the demo doubles as a tour of the pipeline.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

WORLD, BATCH, SEQ, STEPS, LR = 4, 8, 64, 30, 3e-3
OUT = Path("out")


def synthetic_batch(gen: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic sequences x_t = a + b·t (mod V): learnable, so the loss curve means something."""
    a = torch.randint(0, vocab, (BATCH, 1), generator=gen)
    b = torch.randint(1, 5, (BATCH, 1), generator=gen)
    data = (a + b * torch.arange(SEQ + 1)) % vocab
    return data[:, :-1], data[:, 1:]


def train(model, step_fn, steps: int = STEPS, seed: int = 1) -> tuple[list[float], float]:
    """(losses, tokens/s) of `steps` AdamW steps; step_fn(loss) does backward and any gradient reduction."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        tokens, targets = synthetic_batch(gen, 256)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        step_fn(loss)
        opt.step()
        losses.append(loss.item())
    return losses, steps * BATCH * SEQ / (time.perf_counter() - start)


def _rank_main(rank: int, world: int, plan_yaml: str, result_path: str, steps: int = STEPS) -> None:
    import meshplan
    from meshplan.ir import Plan
    from meshplan.models import build_model, load_config

    model = build_model(load_config("tiny"), seed=0)  # the same full model on every rank; compile shards it
    cm = meshplan.compile(model, cluster="local", plan=Plan.from_yaml(plan_yaml),
                          example_inputs=(torch.zeros(BATCH, SEQ, dtype=torch.long),))

    def step(loss):
        loss.backward()
        cm.reduce_gradients()

    losses, tps = train(cm, step, steps)
    if rank == 0:
        Path(result_path).write_text(json.dumps({"losses": losses, "tokens_per_s": tps}))


def run_demo(args=None) -> int:
    import meshplan
    from meshplan.cli import plan_rows
    from meshplan.cli_args import PLOT_HINT, have
    from meshplan.codegen.cli import schedule_table
    from meshplan.models import build_model, load_config
    from meshplan.planner import Options, load_cluster
    from meshplan.planner.simulate import simulate, table
    from meshplan.runtime.launch import spawn
    from meshplan.table import format_table

    steps = getattr(args, "steps", None) or STEPS
    t0 = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    model = build_model(load_config("tiny"), seed=0)
    example = (torch.zeros(BATCH, SEQ, dtype=torch.long),)
    # error_budget=0: exact fp32/bf16-free collectives, so the distributed loss must equal one device's
    cm = meshplan.compile(model, cluster="local", world_size=WORLD, example_inputs=example, error_budget=0.0)
    print(f"== 1. compile: tiny MoE ({cm.graph.summary()}) for {WORLD} gloo ranks ==")
    print(format_table(["op", "strategy", "axis", f"input {list(cm.plan.mesh.names)}", "output", "precision"],
                       plan_rows(cm.plan), align="llllll"))
    print("\n" + cm.explain())
    sch = cm.schedule
    print(f"\n== 2. overlap schedule of one training step: {len(sch.slots)} tasks, predicted makespan "
          f"{sch.makespan * 1e3:.2f} ms, exposed communication {sch.exposed_comm * 1e3:.2f} ms ==")
    print("\n".join(schedule_table(sch).splitlines()[:14]) + "\n  ...")
    if have("matplotlib"):
        from meshplan.codegen.gantt import plot_gantt

        png = plot_gantt({"overlap": sch}, OUT / "demo_schedule.png", f"tiny on {cm.plan.mesh}")
        print(f"wrote {png}")
    else:
        print(f"(Gantt chart skipped: it {PLOT_HINT})")

    print(f"\n== 3. train {steps} steps on {WORLD} processes (gloo) vs one device ==")
    plan_path = OUT / "demo_plan.yaml"
    cm.save_plan(plan_path)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rank0.json"
        spawn(WORLD, _rank_main, str(plan_path), str(result), steps)
        dist_run = json.loads(result.read_text())
    ref_losses, ref_tps = train(build_model(load_config("tiny"), seed=0), lambda loss: loss.backward(), steps)
    diff = max(abs(a - b) for a, b in zip(dist_run["losses"], ref_losses))
    rows = [[i + 1, f"{a:.6f}", f"{b:.6f}", f"{abs(a - b):.2e}"]
            for i, (a, b) in enumerate(zip(dist_run["losses"], ref_losses)) if i % 5 == 0 or i == steps - 1]
    print(format_table(["step", f"loss, {WORLD} ranks", "loss, 1 device", "|diff|"], rows, align="rrrr"))
    ok = diff < 1e-4
    print(f"max |loss diff| over {steps} steps: {diff:.2e} ({'OK' if ok else 'MISMATCH'}); tokens/s: "
          f"{dist_run['tokens_per_s']:,.0f} on {WORLD} ranks, {ref_tps:,.0f} on one process (2-core machine)")

    print("\n== 4. internal-352b on 1440 H800 (seq 8192, global batch 720): planner vs Megatron-style ==")
    from meshplan.ir import trace

    big = trace(build_model(load_config("internal-352b"), device="meta"))
    print(table(simulate(big, load_cluster("h800"), 1440, 720, Options(seq=8192))))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {OUT}/")
    return 0 if ok else 1


def add_parsers(sub) -> None:
    d = sub.add_parser("demo", help="run the embedded end-to-end demo (what `make demo` runs)",
                       description="Compile the tiny MoE model for 4 gloo ranks, show its plan and schedule, train it "
                                   "on 4 processes against one device, and plan internal-352b on 1440 H800 "
                                   "(outputs in ./out/).")
    d.add_argument("--steps", type=int, default=STEPS,
                   help=f"training steps of part 3 on {WORLD} ranks and on one device (default {STEPS})")
    d.set_defaults(func=run_demo)
