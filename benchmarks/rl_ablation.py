"""VAPO minus each of its seven components on the chain task, with rl_compare.py's protocol (one warmed-up policy
per seed shared by every variant, equal RL samples, bootstrap CIs, paired differences full VAPO - variant).
Writes benchmarks/results/rl_ablation.{json,md,png}.

    python benchmarks/rl_ablation.py                          # 8 variants x 5 seeds x 4096 RL samples
    python benchmarks/rl_ablation.py --seeds 0,1,2 --resume   # fewer seeds; reuses rl_compare.py's VAPO runs

The variants are configs/rl/vapo-chain-no-<component>.yaml: value pretraining, decoupled GAE, length-adaptive GAE,
the token-level loss, clip-higher, the positive-example LM loss, group sampling. By default the runs go to the same
directory as rl_compare.py's, so with --resume its full-VAPO runs (and warm-ups) are not repeated.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rl_compare import eval_size, parser, report, run_all  # noqa: E402
from benchmarks.rl_stats import plot  # noqa: E402

COMPONENTS = ("value-pretrain", "decoupled-gae", "length-adaptive", "token-loss", "clip-higher", "pos-lm",
              "group-sampling")


def main(argv=None) -> int:
    p = parser(__doc__, samples=4096)
    p.add_argument("--components", default=",".join(COMPONENTS), help="which components to remove, one run each")
    p.add_argument("--runs", default=str(ROOT / "out" / "rl" / "compare"), help="where the runs' outputs go")
    args = p.parse_args(argv)
    comps = args.components.split(",")
    unknown = sorted(set(comps) - set(COMPONENTS))
    if unknown:
        p.error(f"--components: unknown {', '.join(unknown)} (known: {', '.join(COMPONENTS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {"vapo": "vapo-chain"} | {f"-{c}": f"vapo-chain-no-{c}" for c in comps}
    jobs = [(str(Path(args.configs) / f"{cfg}.yaml"), name, s) for s in seeds for name, cfg in variants.items()]
    t0 = time.time()
    runs = run_all(jobs, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/rl_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = report(runs, list(variants), "vapo", command, time.time() - t0,
                "VAPO ablation (benchmarks/rl_ablation.py): -X is VAPO without component X",
                eval_size(jobs[0][0], args))
    (out / "rl_ablation.md").write_text(md)
    (out / "rl_ablation.json").write_text(json.dumps(runs, indent=1))
    plot(runs, list(variants), out / "rl_ablation.png", f"VAPO ablation on the chain task, {len(seeds)} seeds, "
         f"{args.samples} RL samples per run")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
