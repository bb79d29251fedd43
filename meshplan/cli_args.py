"""The command line's contract with users: a mistake is one line on stderr and exit code 2, never a traceback.

`Parser` is the ArgumentParser every `meshplan` subcommand is built with (argparse makes subparsers of the
parent's class): a bad flag prints `meshplan: error: argument --batch: must be an integer >= 1, got '0'` instead
of a usage block. The typed flag converters below check ranges and finiteness at parse time. `run_command` runs a
subcommand and turns the user-error exceptions of every stage into the same single line (`--debug` re-raises).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from .inputs import MAX_INT, one_line


class UsageError(ValueError):
    """A flag or input the command cannot use; the message names it."""


class RunFailed(RuntimeError):
    """The input was fine but the run failed (a rank died): one line, exit code 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's hook for every parse failure
        print(f"meshplan: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# ---- typed flags (argparse reports "argument --flag: <message>") ------------------------------------------
def int_at_least(lo: int, hi: int = MAX_INT) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text!r}")
        return v

    parse.__name__ = "integer"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """A finite float in lo..hi (lo exclusive when lo_open)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            left = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(f"must be in {left}{'-inf' if lo is None else f'{lo:g}'}, "
                                             f"{'inf' if hi is None else f'{hi:g}'}], got {text!r}")
        return v

    parse.__name__ = "number"
    return parse


def int_list(lo: int, hi: int = MAX_INT) -> Callable[[str], tuple[int, ...]]:
    """A comma-separated list of integers in [lo, hi]."""
    one = int_at_least(lo, hi)

    def parse(text: str) -> tuple[int, ...]:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return tuple(one(p) for p in parts)

    parse.__name__ = "integer list"
    return parse


def have(module: str) -> bool:
    """Whether an optional dependency (an extra: [plot] matplotlib, [hf] transformers) is installed."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


PLOT_HINT = "needs matplotlib: pip install 'meshplan[plot]'"


# ---- running a subcommand ----------------------------------------------------------------------------------
def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean 'the input is wrong', from every stage present in this build."""
    from .ir import PlanError, TraceError
    from .models import ConfigError

    errors: list[type[BaseException]] = [UsageError, ConfigError, PlanError, TraceError, OSError]
    try:
        from .rl.config import RLConfigError
        errors.append(RLConfigError)
    except ImportError:
        pass
    try:  # never imports transformers: the checks module is plain Python
        from .hf.checks import HFConfigError
        errors.append(HFConfigError)
    except ImportError:
        pass
    return tuple(errors)


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """func(args) with user errors reported as one `meshplan: error:` line and exit code 2 (a bug: one line and
    exit code 1). With args.debug the exception propagates with its traceback."""
    from .runtime.local_spawn import Stopped

    if getattr(args, "debug", False):
        return int(func(args) or 0)
    try:
        return int(func(args) or 0)
    except Stopped as e:  # a signal to the launcher: the ranks are already stopped
        print(f"meshplan: {e}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # `meshplan trace x | head`: the reader left; stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except user_errors() as e:
        print(f"meshplan: error: {_describe(e)}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"meshplan: error: {_describe(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("meshplan: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - not the user's mistake: still one line, the traceback on --debug
        print(f"meshplan: internal error: {type(e).__name__}: {_describe(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return one_line(f"{e.filename}: {e.strerror}" if e.filename else e.strerror)
    return one_line(str(e)) or type(e).__name__


def standalone(prog: str, add_parsers: Callable, argv: list[str] | None = None) -> int:
    """`python -m meshplan.<stage>.cli ...`: one stage's subcommands on their own, with the same error contract."""
    parser = Parser(prog=prog)
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args.func, args)
