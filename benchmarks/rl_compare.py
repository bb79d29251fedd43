"""VAPO vs DAPO vs GRPO vs PPO on the chain task (long, uneven responses): per seed one warmed-up policy that every
algorithm starts from, the same RL sample budget per algorithm, several seeds, bootstrap CIs and paired differences.
Writes benchmarks/results/rl_compare.{json,md,png}.

    python benchmarks/rl_compare.py                                   # 4 algorithms x 5 seeds x 4096 RL samples
    python benchmarks/rl_compare.py --samples 512 --seeds 0 --jobs 1  # a reduced run
    python benchmarks/rl_compare.py --seeds 0 --algos grpo --set optim.actor_lr=3e-4 --pilot lr3e-4
                                      # a pilot: the knob changed for every run, recorded in results/rl_pilots.json

Each run is `meshplan train configs/rl/<algo>-chain.yaml` with train.max_samples = --samples (RL rollouts generated,
DAPO's discarded resamples included) and the seed overridden. The warm-up runs first, once, into a shared cache; every
run then loads the same weights (checked: same cache file, same held-out start). By default one warm-up (seed 0)
serves every seed, so the seeds differ in RL sampling only (a warm-up costs about one RL run); --warmup-seed -1
gives each seed its own warm-up, still shared by the algorithms. VAPO's value-pretraining rollouts come before
RL and are reported apart (pretrain_samples). Runs go --jobs at a time, one process and one torch thread each;
--resume skips finished runs, --report-only summarises them.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rl_stats import check_same_start, paired_table, plot, summary_table  # noqa: E402
from meshplan.rl.config import RLConfig, RLConfigError, fill, load_rl_config, validate  # noqa: E402
from meshplan.rl.metrics import read_metrics  # noqa: E402
from meshplan.rl.trainer import train  # noqa: E402


def override(cfg: RLConfig, assignments: list[str]) -> RLConfig:
    """Apply --set SECTION.FIELD=VALUE (VALUE read as YAML), the same to every algorithm's config, with the config
    loader's field and type checks: a pilot changes a knob for all algorithms at once."""
    for a in assignments:
        key, sep, value = a.partition("=")
        if not sep or not key:
            raise RLConfigError(f"--set {a!r}: expected SECTION.FIELD=VALUE, e.g. optim.actor_lr=3e-4")
        section, _, name = key.rpartition(".")
        target = getattr(cfg, section, None) if section else cfg
        if not hasattr(target, "__dataclass_fields__"):
            raise RLConfigError(f"--set {a!r}: rl.{section} is not a config section")
        v = yaml.safe_load(value)
        if isinstance(v, str) and isinstance(getattr(target, name, None), float):
            try:  # YAML 1.1 reads "3e-4" (no dot) as a string
                v = float(v)
            except ValueError:
                pass
        fill(target, {name: v}, f"rl.{section}" if section else "rl")
    return cfg


def configure(cfg: RLConfig, seed: int, out: Path, args) -> RLConfig:
    """The run's config: the --set overrides, the seed, the sample budget (the budget, not the step count, ends a
    run), the evals."""
    override(cfg, args.set)
    per_step = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    cfg.seed = seed
    cfg.train.max_samples = args.samples
    cfg.train.steps = 10 * (args.samples // per_step + 1)
    cfg.train.eval_every = max(1, args.samples // per_step // args.evals)
    cfg.train.checkpoint_every = cfg.train.steps  # the last step only: a checkpoint of this model costs ~0.1 s
    cfg.train.nproc, cfg.train.threads, cfg.train.plot = 1, 1, False
    cfg.train.out = str(out)
    cfg.warmup.cache = args.warmup_cache or str(Path(args.runs) / "warmup-cache")  # shared by the algorithms
    cfg.warmup.seed = args.warmup_seed
    validate(cfg)
    return cfg


def summarize(algo: str, seed: int, out: Path, per_step: int) -> dict:
    """One run's record for rl_compare.json, from its metrics.jsonl."""
    records = read_metrics(out / "metrics.jsonl")
    rl = [r for r in records if r.get("phase") == "rl"]
    # [samples, held-out accuracy, response length, accuracy on the shorter / longer half of the split]
    evals = [[r["samples"], r["eval_accuracy"], r["eval_response_len"], r.get("eval_accuracy_short"),
              r.get("eval_accuracy_long")] for r in rl if "eval_accuracy" in r]
    warm = [r for r in records if r.get("phase") == "warmup"]
    vp = [r for r in records if r.get("phase") == "value_pretrain"]
    return {"algo": algo, "seed": seed, "start": evals[0][1], "final": evals[-1][1],
            "best": max(e[1] for e in evals), "samples": rl[-1]["samples"], "pretrain_samples": len(vp) * per_step,
            "steps": rl[-1]["step"], "wall_s": rl[-1].get("time_s", 0.0), "cpu_s": rl[-1].get("cpu_s", 0.0),
            "warmup": Path(warm[0].get("cached", "")).name if warm else "",
            "curve": evals, "train_curve": [[r["samples"], r["response_len"], r["reward"]] for r in rl if r["step"]]}


def run_one(config: str, algo: str, seed: int, args) -> dict:
    cfg = load_rl_config(config)
    out = Path(args.runs) / f"{algo}-s{seed}"
    configure(cfg, seed, out, args)
    metrics = out / "metrics.jsonl"
    finished = metrics.exists() and any(r.get("samples", 0) >= args.samples for r in read_metrics(metrics))
    if args.report_only and not finished:
        return None
    if not ((args.resume or args.report_only) and finished):
        train(cfg)
    return summarize(algo, seed, out, cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt)


def warm_one(config: str, seed: int, args) -> float:
    """Fill the seed's warm-up cache (a 0-step GRPO run: the warm-up and one held-out evaluation)."""
    cfg = load_rl_config(config)
    configure(cfg, seed, Path(args.runs) / f"warmup-s{seed}", args)
    cfg.algo.critic, cfg.train.max_samples, cfg.train.steps = False, 0, 0
    t0 = time.time()
    train(cfg)
    return time.time() - t0


def run_all(jobs: list[tuple[str, str, int]], args) -> list[dict]:
    """Warm-ups first (one per seed, in parallel), then the (config, algo, seed) runs, --jobs at a time."""
    # one warm-up per seed, or (--warmup-seed >= 0) one for all seeds
    seeds = sorted({s for _, _, s in jobs})[: 1 if args.warmup_seed >= 0 else None] if not args.report_only else []
    pool = ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) if args.jobs > 1 else None
    mapper = pool.map if pool else map  # --jobs 1: in this process, one run after another
    try:
        for seed, dt in zip(seeds, mapper(warm_one, [jobs[0][0]] * len(seeds), seeds, [args] * len(seeds))):
            print(f"warm-up seed {seed}: {dt:.0f} s", flush=True)
        runs = []
        for r in mapper(run_one, *zip(*jobs), [args] * len(jobs)):
            if r is None:  # --report-only: an unfinished run
                continue
            runs.append(r)
            print(f"{r['algo']} seed {r['seed']}: held-out {r['start']:.3f} -> {r['final']:.3f} (best {r['best']:.3f})"
                  f" in {r['samples']} samples (+{r['pretrain_samples']} pretrain), {r['wall_s']:.0f} s", flush=True)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    check_same_start(runs)
    return runs


def eval_size(config: str, args) -> int:
    """The held-out split's size the runs of `config` evaluate on (after the --set overrides)."""
    cfg = load_rl_config(config)
    override(cfg, args.set)
    return cfg.task.eval_size


def report(runs: list[dict], algos: list[str], ref: str, command: str, wall_s: float, title: str,
           n_eval: int) -> str:
    return (f"# {title}\n\n`{command}` — {wall_s / 60:.0f} min wall on this machine\n\n"
            f"Held-out accuracy: greedy exact-answer accuracy on the task's fixed {n_eval}-problem eval split. Every "
            f"algorithm of a seed starts from the same warmed-up weights (checked); gain = final - start. CIs: 95% "
            f"percentile bootstrap over seeds (10,000 resamples). RL samples: rollouts generated (DAPO's "
            f"discarded resamples included); value-pretraining rollouts are counted apart.\n\n"
            + summary_table(runs, algos) + "\n\nPaired per seed (same start, same prompts' seed):\n\n"
            + paired_table(runs, algos, ref) + "\n\nPer run (held-out accuracy start -> final, best):\n\n"
            + "\n".join(f"- {r['algo']} seed {r['seed']}: {r['start']:.3f} -> {r['final']:.3f} (best {r['best']:.3f}),"
                        f" {r['samples']} + {r['pretrain_samples']} samples" for r in runs) + "\n")


def parser(doc: str, samples: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--samples", type=int, default=samples, help="RL sample budget per run")
    p.add_argument("--evals", type=int, default=4, help="held-out evaluations per run (after the start)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs at a time (one process, one thread each; default: one per core)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--resume", action="store_true", help="skip finished runs")
    p.add_argument("--report-only", action="store_true", help="report the finished runs, run nothing")
    p.add_argument("--warmup-seed", type=int, default=0,
                   help="the seed of the one warm-up every run starts from (-1: each seed warms up its own)")
    p.add_argument("--warmup-cache", default="", help="the warm-ups' directory (default: RUNS/warmup-cache)")
    p.add_argument("--configs", default=str(ROOT / "configs" / "rl"), help="where the runs' YAML files are")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field for every run, e.g. --set optim.actor_lr=3e-4 (repeatable)")
    p.add_argument("--pilot", default="", help="append this run's settings and per-run results under this name "
                   "to benchmarks/results/rl_pilots.json (the record of the regime search) instead of writing "
                   "rl_compare.*")
    return p


def log_pilot(name: str, runs: list[dict], args, wall_s: float, path: Path) -> None:
    """One entry of the pilot record: the settings (--set, budget, seeds) and each run's start/final/best."""
    with open(path, "a+") as f:  # pilots run side by side: one writer at a time
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        entries = json.loads(text) if text.strip() else []
        entries.append(pilot_entry(name, runs, args, wall_s))
        f.seek(0)
        f.truncate()
        f.write(json.dumps(entries, indent=1))


def pilot_entry(name: str, runs: list[dict], args, wall_s: float) -> dict:
    keep = ("algo", "seed", "start", "final", "best", "samples", "pretrain_samples", "wall_s", "curve")
    return {"name": name, "set": args.set, "samples": args.samples, "seeds": args.seeds,
            "warmup_seed": args.warmup_seed, "wall_s": round(wall_s),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "runs": [{k: r[k] for k in keep if k in r} for r in runs]}


def main(argv=None) -> int:
    p = parser(__doc__, samples=4096)
    p.add_argument("--algos", default="vapo,dapo,grpo,ppo")
    p.add_argument("--task", default="chain", help="configs/rl/<algo>-<task>.yaml")
    p.add_argument("--runs", default=str(ROOT / "out" / "rl" / "compare"), help="where the runs' outputs go")
    args = p.parse_args(argv)
    algos, seeds = args.algos.split(","), [int(s) for s in args.seeds.split(",")]
    jobs = [(str(Path(args.configs) / f"{a}-{args.task}.yaml"), a, s) for s in seeds for a in algos]
    t0 = time.time()
    runs = run_all(jobs, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.pilot:
        log_pilot(args.pilot, runs, args, time.time() - t0, out / "rl_pilots.json")
        print(summary_table(runs, algos))
        return 0
    command = "python benchmarks/rl_compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = report(runs, algos, "vapo", command, time.time() - t0, "RL comparison (benchmarks/rl_compare.py)",
                eval_size(jobs[0][0], args))
    (out / "rl_compare.md").write_text(md)
    (out / "rl_compare.json").write_text(json.dumps(runs, indent=1))
    plot(runs, algos, out / "rl_compare.png", f"chain task, {len(seeds)} seeds, {args.samples} RL samples per run: "
         "mean and 95% bootstrap band")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
