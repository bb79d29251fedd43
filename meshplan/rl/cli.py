"""`meshplan train CONFIG [--nproc N] [--resume] [--steps K] [--out DIR]` (wired into meshplan.cli by the lead)."""
from __future__ import annotations

import argparse
import sys

from .config import RLConfigError, load_rl_config


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="RL-train a model on a verifiable task (VAPO, PPO, GRPO, DAPO)",
                              description="Train with the RL config (configs/rl/*.yaml) through meshplan's runtime.")
    p.add_argument("config", help="RL config YAML, e.g. configs/rl/vapo-tiny.yaml")
    p.add_argument("--nproc", type=int, default=None, help="data-parallel processes (gloo); default: train.nproc")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--steps", type=int, default=None, help="RL steps to reach; default: train.steps")
    p.add_argument("--out", default=None, help="output directory; default: train.out")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.set_defaults(func=cmd_train)
    return p


def add_parsers(subparsers) -> None:
    """The hook meshplan/cli.py calls for every stage."""
    add_train_parser(subparsers)


def cmd_train(args) -> int:
    from meshplan.models import ConfigError

    from .trainer import train

    try:
        cfg = load_rl_config(args.config)
        if args.nproc is not None:
            cfg.train.nproc = args.nproc
        if args.steps is not None:
            cfg.train.steps = args.steps
        if args.out is not None:
            cfg.train.out = args.out
        if args.seed is not None:
            cfg.seed = args.seed
        from .config import validate
        validate(cfg)
        records = train(cfg, resume=args.resume)
    except (RLConfigError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    evals = [r for r in records if r.get("phase") == "rl" and "eval_accuracy" in r]
    if evals:
        print(f"held-out accuracy: {evals[0]['eval_accuracy']:.3f} at step {evals[0]['step']} -> "
              f"{evals[-1]['eval_accuracy']:.3f} at step {evals[-1]['step']}; metrics in {cfg.train.out}/metrics.jsonl")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="meshplan")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
