"""The measuring subcommand: `meshplan calibrate` (meshplan/cli.py calls `add_parsers(subparsers)`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_args import int_at_least, int_list
from ..inputs import user_config_dir
from ..table import format_table


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate", help="measure this machine (matmul, gloo collectives) into a cluster YAML",
                              description="Measure this machine (matmul rate, copy bandwidth, gloo alpha/beta per "
                                          "collective) into a cluster YAML in your config directory.")
    p.add_argument("--out", default=None,
                   help="output YAML (default $XDG_CONFIG_HOME/meshplan/clusters/local.yaml, which --cluster local "
                        "then reads)")
    p.add_argument("--ranks", type=int_list(2, 64), default=(2, 4),
                   help="rank counts to measure, comma-separated (default 2,4)")
    p.add_argument("--sizes", type=int_list(1, 1 << 30), default=None,
                   help="bytes held per rank, comma-separated (default 4K..4M)")
    p.add_argument("--reps", type=int_at_least(1, 1000), default=5, help="timed repetitions per point (median)")
    p.set_defaults(func=cmd_calibrate)
    return p


def cmd_calibrate(args) -> int:
    from .calibrate import DEFAULT_SIZES, calibrate  # torch and gloo load only when a measurement runs


    out = Path(args.out) if args.out else user_config_dir() / "clusters" / "local.yaml"
    cluster, samples = calibrate(out, args.ranks, args.sizes or DEFAULT_SIZES, args.reps)
    print(f"matmul peak {cluster.peak_flops / 1e9:.1f} GFLOP/s (size efficiency c = {cluster.gemm_half_size:.0f}), "
          f"copy bandwidth {cluster.hbm_bandwidth / 1e9:.1f} GB/s")
    rows = [[k, f"{ab.latency * 1e6:.1f}", f"{ab.bandwidth / 1e9:.3f}"]
            for k, ab in cluster.intra_node.collectives.items()]
    print(format_table(["collective", "alpha us/step", "bandwidth GB/s"], rows, align="lrr"))
    print(f"wrote {out} ({len(samples)} samples)")
    return 0




def add_parsers(subparsers) -> None:
    add_calibrate_parser(subparsers)


def main(argv=None) -> int:
    """Standalone use: python -m meshplan.measure.cli calibrate --ranks 2."""
    from ..cli_args import standalone

    return standalone("meshplan-measure", add_parsers, argv)


if __name__ == "__main__":
    sys.exit(main())
