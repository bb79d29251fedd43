"""`meshplan train CONFIG [--nproc N] [--resume | --overwrite] [--steps K] [--out DIR]` (wired into meshplan.cli).

Everything is checked here, in the launcher, before any rank process starts: the config, the model it names,
the task's sequence lengths against the model, and the output directory (a directory that already holds a run
is refused unless --resume continues it or --overwrite replaces it).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..cli_args import UsageError, int_at_least, nonneg_int, number, standalone
from .config import load_rl_config, validate
from .distributed import under_torchrun

RUN_FILES = ("metrics.jsonl", "checkpoints", "curves.png")  # what a run writes into its --out directory


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="RL-train a model on a verifiable task (VAPO, PPO, GRPO, DAPO)",
                              description="Train with an RL config through meshplan's runtime: warm-up, value "
                                          "pretraining, then RL steps, with metrics, checkpoints and a plot.")
    p.add_argument("config", help="RL config: a NAME (vapo-tiny, ppo-tiny, grpo-tiny, dapo-tiny) or a YAML path")
    p.add_argument("--nproc", type=int_at_least(1, 256), default=None,
                   help="data-parallel processes (gloo); default: train.nproc")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the run in OUT from its newest OUT/checkpoints/step_NNNNNN/")
    resume.add_argument("--overwrite", action="store_true",
                        help="replace the run in OUT (its metrics, checkpoint and plot) instead of refusing")
    p.add_argument("--steps", type=nonneg_int, default=None, help="RL steps to reach; default: train.steps")
    p.add_argument("--out", default=None, help="output directory; default: train.out")
    p.add_argument("--seed", type=nonneg_int, default=None, help="override the config's seed")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default=None,
                   help="collective backend; default: train.backend (auto: NCCL when every local rank has a GPU of "
                        "its own, else gloo)")
    p.add_argument("--timeout", type=number(0.0, 86400.0, lo_open=True), default=600.0,
                   help="collective timeout in seconds: a hung or stopped rank ends the run after this (+ a few s)")
    p.set_defaults(func=cmd_train)
    return p


def add_parsers(subparsers) -> None:
    """The hook meshplan/cli.py calls for every stage."""
    add_train_parser(subparsers)


def prepare_out(out: Path, resume: bool, overwrite: bool, writer: bool = True) -> None:
    """Refuse an --out that holds a run unless resuming or overwriting; remove saves that died mid-way.
    writer=False (every torchrun rank but 0): check only, so the ranks agree and one process deletes."""
    import shutil

    from .checkpoint import remove_partial_steps

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {str(out)!r} exists and is not a directory")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (resume or overwrite):
        raise UsageError(f"--out: {str(out)!r} already holds a run ({', '.join(held)}); pass --resume to continue "
                         f"it or --overwrite to replace it")
    if not writer:
        return
    if overwrite:
        for name in held:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    remove_partial_steps(out)


def cmd_train(args) -> int:
    from .trainer import preflight, train

    cfg = load_rl_config(args.config)
    if under_torchrun():  # the world is torchrun's
        world = int(os.environ["WORLD_SIZE"])
        if args.nproc is not None and args.nproc != world:
            raise UsageError(f"--nproc: {args.nproc}, but torchrun started {world} ranks (drop --nproc under torchrun)")
        cfg.train.nproc = world
    elif args.nproc is not None:
        cfg.train.nproc = args.nproc
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.out is not None:
        cfg.train.out = args.out
    if args.seed is not None:
        cfg.seed = args.seed
    if args.backend is not None:
        cfg.train.backend = args.backend
    validate(cfg)
    preflight(cfg)
    writer = not under_torchrun() or os.environ.get("RANK") == "0"  # under torchrun every rank runs this
    prepare_out(Path(cfg.train.out), args.resume, args.overwrite, writer)
    if cfg.warmup.cache and writer:
        from .checkpoint import remove_stale_temps

        remove_stale_temps(cfg.warmup.cache)  # an interrupted cache write leaves its temp file here too
    records = train(cfg, resume=args.resume, timeout_s=args.timeout)
    evals = [r for r in records if r.get("phase") == "rl" and "eval_accuracy" in r]
    if evals and writer:
        print(f"held-out accuracy: {evals[0]['eval_accuracy']:.3f} at step {evals[0]['step']} -> "
              f"{evals[-1]['eval_accuracy']:.3f} at step {evals[-1]['step']}; metrics in {cfg.train.out}/metrics.jsonl")
    return 0


def main(argv=None) -> int:
    return standalone("meshplan", add_train_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
