"""VAPO vs DAPO vs GRPO vs PPO on the tiny arithmetic task: same warmed-up start, same RL sample budget, several
seeds. Writes benchmarks/results/rl_compare.{md,json,png}.

    python benchmarks/rl_compare.py                                  # 4 algorithms x 3 seeds, 32768 samples each
    python benchmarks/rl_compare.py --samples 4096 --seeds 0         # a reduced run

Each run is `meshplan train configs/rl/<algo>-tiny.yaml` with train.max_samples = --samples (RL rollouts generated,
DAPO's discarded resamples included) and the seed overridden. VAPO's value-pretraining rollouts come before RL
and are reported separately (vp_samples). Runs are sequential (the CPUs are the bottleneck); an interrupted
comparison continues with --resume.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshplan.rl.config import load_rl_config, validate  # noqa: E402
from meshplan.rl.metrics import read_metrics  # noqa: E402
from meshplan.rl.trainer import train  # noqa: E402


def run_one(algo: str, seed: int, args) -> dict:
    cfg = load_rl_config(ROOT / "configs" / "rl" / f"{algo}-tiny.yaml")
    per_step = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    cfg.seed = seed
    cfg.train.max_samples = args.samples
    cfg.train.steps = 10 * (args.samples // per_step + 1)  # the sample budget, not the step count, ends a run
    cfg.train.eval_every = max(1, args.samples // per_step // args.evals)
    cfg.train.checkpoint_every = max(1, args.samples // per_step // 4)
    cfg.train.nproc = args.nproc
    cfg.train.out = str(Path(args.runs) / f"{algo}-s{seed}")
    cfg.warmup.cache = str(Path(args.runs) / "warmup-cache")  # one warm-up per seed, shared by the algorithms
    validate(cfg)
    metrics = Path(cfg.train.out) / "metrics.jsonl"
    t0 = time.time()
    finished = metrics.exists() and any(r.get("samples", 0) >= args.samples for r in read_metrics(metrics))
    if not (args.resume and finished):
        train(cfg, resume=args.resume)
    records = read_metrics(metrics)
    rl = [r for r in records if r.get("phase") == "rl"]
    evals = [(r["samples"], r["eval_accuracy"]) for r in rl if "eval_accuracy" in r]
    vp = [r for r in records if r.get("phase") == "value_pretrain"]
    return {"algo": algo, "seed": seed, "start_accuracy": evals[0][1], "final_accuracy": evals[-1][1],
            "best_accuracy": max(a for _, a in evals), "samples": rl[-1]["samples"], "steps": rl[-1]["step"],
            "vp_samples": len(vp) * per_step, "wall_s": rl[-1].get("time_s", 0.0), "cpu_s": rl[-1].get("cpu_s", 0.0),
            "run_s": time.time() - t0,
            "curve": evals}


def table(results: list[dict], algos: list[str]) -> str:
    lines = ["| algorithm | seeds | held-out acc. start | final (mean ± std) | gain final - start (mean ± std) | best "
             "| RL samples | value-pretrain samples | wall time per run | CPU time per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for algo in algos:
        rs = [r for r in results if r["algo"] == algo]
        if not rs:
            continue
        f = np.array([r["final_accuracy"] for r in rs])
        gain = f - np.array([r["start_accuracy"] for r in rs])  # seeds start from different warm-ups
        lines.append(f"| {algo} | {len(rs)} | {np.mean([r['start_accuracy'] for r in rs]):.3f} | "
                     f"{f.mean():.3f} ± {f.std():.3f} | {gain.mean():+.3f} ± {gain.std():.3f} | "
                     f"{np.mean([r['best_accuracy'] for r in rs]):.3f} | "
                     f"{rs[0]['samples']} | {rs[0]['vp_samples']} | {np.mean([r['wall_s'] for r in rs]):.0f} s | "
                     f"{np.mean([r['cpu_s'] for r in rs]):.0f} s |")
    return "\n".join(lines)


def plot(results: list[dict], algos: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algo in algos:
        curves = [r["curve"] for r in results if r["algo"] == algo]
        if not curves:
            continue
        n = min(len(c) for c in curves)  # runs share an eval schedule; DAPO's steps may end it at other counts
        xs = np.array([[c[i][0] for i in range(n)] for c in curves]).mean(0)
        ys = np.array([[c[i][1] - c[0][1] for i in range(n)] for c in curves])  # gain over each seed's start
        line, = ax.plot(xs, ys.mean(0), label=f"{algo} ({len(curves)} seeds)")
        ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("RL samples generated")
    ax.set_ylabel("held-out accuracy - start (greedy)")
    ax.set_title("tiny MoE, column addition: gain over the warm-up, mean and min-max over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", default="vapo,dapo,grpo,ppo")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samples", type=int, default=32768, help="RL sample budget per run")
    p.add_argument("--evals", type=int, default=8, help="held-out evaluations per run")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--runs", default=str(ROOT / "out" / "rl" / "compare"), help="where the runs' outputs go")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--resume", action="store_true", help="skip finished runs, resume unfinished ones")
    args = p.parse_args(argv)
    algos, seeds = args.algos.split(","), [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in seeds:
        for algo in algos:
            r = run_one(algo, seed, args)
            results.append(r)
            print(f"{algo} seed {seed}: held-out {r['start_accuracy']:.3f} -> {r['final_accuracy']:.3f} "
                  f"(best {r['best_accuracy']:.3f}) in {r['samples']} samples, {r['wall_s']:.0f} s", flush=True)
    md = (f"# RL comparison (benchmarks/rl_compare.py)\n\n`python benchmarks/rl_compare.py --samples {args.samples} "
          f"--seeds {args.seeds} --algos {args.algos}`\n\nHeld-out accuracy is greedy exact-answer accuracy on "
          f"the task's 256-problem eval split; every run starts from the same warmed-up policy for its seed. "
          f"Times cover value pretraining and RL (not the shared warm-up); wall time depends on what else ran on "
          f"the machine, CPU time is the run's own.\n\n"
          + table(results, algos) + "\n\nPer run (held-out accuracy start -> final, best):\n\n"
          + "\n".join(f"- {r['algo']} seed {r['seed']}: {r['start_accuracy']:.3f} -> {r['final_accuracy']:.3f} "
                      f"(best {r['best_accuracy']:.3f}), {r['samples']} samples" for r in results) + "\n")
    (out / "rl_compare.md").write_text(md)
    (out / "rl_compare.json").write_text(json.dumps(results, indent=1))
    plot(results, algos, out / "rl_compare.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
