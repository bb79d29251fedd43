"""The runtime on a GPU: equality to one device on CUDA, and what codegen's Triton kernels do to a step.

Checks (float32, TF32 off): 2 rank processes sharing the one GPU (gloo stages CUDA tensors through the host, so
this checks correctness, not speed), each plan's loss and every gradient against the single-device model on the
same GPU. The MoE runs on the Triton kernels (grouped SwiGLU GEMMs, fused un-permute + combine) as
CUDA's "auto" picks; the overlap plan runs the emitted code with 2 chunks, its all-to-alls on each rank's comm
stream; FP8 dispatch (lossy) must give the torch path's numbers on the Triton path (the fused permute + quantise
kernel is bit-exact to its reference).

Timing: one rank, bf16, a mid-size MoE model (EP plan on a 1-rank mesh, so the MoE goes through run_experts and
combine): forward without grad and forward+backward, MESHPLAN_KERNELS=torch vs triton, alternating, median of
CUDA-event timings.

    python benchmarks/runtime_gpu.py            # writes benchmarks/results/runtime_gpu.json
    python benchmarks/runtime_gpu.py --device cpu --skip-timing   # the checks on CPU (torch path): a dry run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from meshplan.ir import Mesh, Plan, trace  # noqa: E402
from meshplan.models import ModelConfig, build_model  # noqa: E402
from meshplan.runtime import ParallelModel  # noqa: E402
from meshplan.runtime.launch import spawn  # noqa: E402
from meshplan.runtime.overlap import enable_overlap  # noqa: E402
from meshplan.runtime.process_groups import MeshGroups  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "runtime_gpu.json"
TINY = ModelConfig(name="tiny-gpu", vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                   n_experts=4, top_k=2, n_shared_experts=1, max_seq_len=32)
MID = ModelConfig(name="mid-gpu", vocab_size=32000, dim=2048, n_layers=4, n_heads=16, n_kv_heads=8, ffn_dim=1408,
                  n_experts=16, top_k=4, max_seq_len=2048)


def step(model_or_pm, tokens, targets):
    out = model_or_pm(tokens)
    loss = F.cross_entropy(out.flatten(0, 1).float(), targets.flatten().to(out.device))
    loss.backward()
    return loss


def reference(cfg, tokens, targets, device):
    model = build_model(cfg, seed=0).to(device)
    loss = step(model, tokens.to(device), targets)
    return loss.item(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


def check_worker(rank: int, world: int, outdir: str, device: str) -> None:
    """Every check on this rank (ranks are processes: see MeshGroups.in_process on why not threads); writes
    outdir/rank{r}.json."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = TINY
    graph = trace(build_model(cfg, seed=0))
    data = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    tokens, targets = data[:, :-1], data[:, 1:]
    ref_loss, ref_grads = reference(cfg, tokens, targets, device)
    mesh = Mesh.of(mp=world)
    groups = MeshGroups.from_world(mesh, timeout_s=120, device=device)

    def run(plan, chunks=0):
        pm = ParallelModel(build_model(cfg, seed=0), plan, graph=graph, groups=groups)
        if chunks:
            enable_overlap(pm, tokens.shape[0], tokens.shape[1], chunks=chunks)
        loss = step(pm, tokens, targets)
        pm.reduce_gradients()
        return loss.item(), {n: g.detach().cpu() for n, g in pm.full_grads().items()}

    rows = []
    for name, strategies, chunks in (("sp+ep", {"attention": "sp", "moe": "ep"}, 0),
                                     ("tp+tp", {"attention": "tp", "moe": "tp"}, 0),
                                     ("sp+ep overlap c2 (comm streams)", {"attention": "sp", "moe": "ep"}, 2)):
        loss, grads = run(Plan.build(graph, mesh, strategies), chunks)
        rows.append(dict(check=name, loss_rel_err=abs(loss - ref_loss) / abs(ref_loss),
                         grad_rel_err=max_rel(grads, ref_grads)))
    fp8 = Plan.build(graph, mesh, {"attention": "sp", "moe": "ep"}, precision={"dispatch": "fp8"})
    got = run(fp8)
    os.environ["MESHPLAN_KERNELS"] = "torch"
    want = run(fp8)
    os.environ.pop("MESHPLAN_KERNELS")
    rows.append(dict(check="sp+ep fp8 dispatch: triton == torch path",
                     loss_rel_err=abs(got[0] - want[0]) / abs(want[0]), grad_rel_err=max_rel(got[1], want[1]),
                     vs_one_device_loss=abs(got[0] - ref_loss) / abs(ref_loss)))
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(rows))


def max_rel(grads, ref):
    return max(float((grads[n].float() - g.float()).norm() / g.float().norm().clamp_min(1e-30)) for n, g in ref.items())


def checks(device, world=2):
    """The worst error over the ranks of a `world`-process gloo world whose ranks all use `device`."""
    with tempfile.TemporaryDirectory() as tmp:
        spawn(world, check_worker, tmp, device, backend="gloo", timeout_s=300)
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    rows = []
    for same in zip(*per_rank):
        row = dict(same[0])
        for key in ("loss_rel_err", "grad_rel_err"):
            row[key] = max(r[key] for r in same)
        row["ok"] = row["loss_rel_err"] < 1e-4 and row["grad_rel_err"] < 1e-4
        rows.append(row)
    return rows


def timing(device, reps=10, batch=4, seq=1024):
    cfg = MID
    model = build_model(cfg, seed=0).to(torch.bfloat16)
    graph = trace(model)
    mesh = Mesh.of(mp=1)
    plan = Plan.build(graph, mesh, {"attention": "sp", "moe": "ep"})
    pm = ParallelModel(model, plan, graph=graph, groups=MeshGroups.single(mesh, device))
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(tokens, -1, 1)

    def fwd():
        with torch.no_grad():
            pm(tokens)

    def train():
        pm.zero_grad(set_to_none=True)
        step(pm, tokens, targets)

    def time_ms(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    rows = []
    for what, fn in (("forward (no grad)", fwd), ("forward+backward", train)):
        times = {"torch": [], "triton": []}
        for backend in times:  # warm-up: compile the kernels, fill the allocator
            os.environ["MESHPLAN_KERNELS"] = backend
            fn(), fn()
        for _ in range(reps):
            for backend in times:
                os.environ["MESHPLAN_KERNELS"] = backend
                times[backend].append(time_ms(fn))
        os.environ.pop("MESHPLAN_KERNELS")
        med = {b: statistics.median(t) for b, t in times.items()}
        rows.append(dict(what=what, model=cfg.name, tokens=tokens.numel(), ms_torch=med["torch"],
                         ms_triton=med["triton"], triton_over_torch=med["triton"] / med["torch"],
                         spread_torch=(max(times["torch"]) - min(times["torch"])) / med["torch"],
                         spread_triton=(max(times["triton"]) - min(times["triton"])) / med["triton"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("runtime_gpu: no CUDA device; run it on a GPU machine (or --device cpu --skip-timing)")
        return 0
    result = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__)
    result["checks"] = checks(args.device)
    for r in result["checks"]:
        print(f"{r['check']:42s} loss rel err {r['loss_rel_err']:.1e}  grad rel err {r['grad_rel_err']:.1e}  "
              f"{'ok' if r['ok'] else 'MISMATCH'}", flush=True)
    if not args.skip_timing:
        result["timing"] = timing(args.device)
        for r in result["timing"]:
            print(f"{r['what']:20s} {r['model']} {r['tokens']} tokens: torch {r['ms_torch']:8.2f} ms  triton "
                  f"{r['ms_triton']:8.2f} ms  triton/torch {r['triton_over_torch']:.2f}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0 if all(r["ok"] for r in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
