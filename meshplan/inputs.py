"""Reading what users hand meshplan: YAML files, named configs, and the numbers in them.

Every failure becomes one exception of the caller's error class whose message is one line naming the file (and
the line and column of a YAML error) or the field and the constraint:

    model config 'm.yaml': not valid YAML at line 3, column 7: mapping values are not allowed here
    model.vocab_size: must be an integer in [1, 2147483647], got 1000000000000000000000000000000

Named configs ("tiny", "h800", "vapo-tiny") are looked up in $XDG_CONFIG_HOME/meshplan/<kind>/ (the user's
own configs and `meshplan calibrate`'s output; default ~/.config/meshplan) and then in the configs shipped with
the package; a path (anything ending in .yaml/.yml) is read relative to the working directory (docs/reference.md,
"Local launches and input files").
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from .resources import shipped

MAX_INT = 2**31 - 1  # every size, count and step in a config fits an int32 (and so every kernel index)
MAX_FILE_BYTES = 16 << 20  # a config is a few KiB; anything this large is not one


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the constraint. The base of every
    stage's config error (models' ConfigError is this class, the planner's ClusterError subclasses it), so a
    front end catches one class whatever stage read the file."""


def one_line(text: str) -> str:
    """Collapse whitespace and newlines: a message for a terminal's single error line."""
    return " ".join(str(text).split())


# ---- files -------------------------------------------------------------------------------------------------
def user_config_dir() -> Path:
    """$XDG_CONFIG_HOME/meshplan, else ~/.config/meshplan (the XDG base directory default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "meshplan"


def is_path(name_or_path: str | Path) -> bool:
    return isinstance(name_or_path, Path) or str(name_or_path).endswith((".yaml", ".yml")) or os.sep in str(
        name_or_path)


def find_config(kind: str, name_or_path: str | Path, what: str, error: type[Exception]) -> Path:
    """The file for a name (user directory first, then the shipped configs) or a path; else `error` listing the
    known names."""
    if is_path(name_or_path):
        p = Path(name_or_path)
        if p.is_file():
            return p
        if p.is_dir():
            raise error(f"{what} {str(p)!r}: is a directory, not a YAML file")
    else:
        for directory in (user_config_dir() / kind, shipped(kind)):
            p = directory / f"{name_or_path}.yaml"
            if p.is_file():
                return p
    raise error(f"{what} {str(name_or_path)!r}: no such file, and not one of {known_configs(kind)}")


def known_configs(kind: str) -> list[str]:
    names = set()
    for directory in (user_config_dir() / kind, shipped(kind)):
        if directory.is_dir():
            names.update(q.stem for q in directory.glob("*.yaml"))
    return sorted(names)


def read_yaml(path: str | Path, what: str, error: type[Exception]):
    """yaml.safe_load of a file; OS, encoding and syntax errors become one `error` line naming the file."""
    p = Path(path)
    where = f"{what} {str(p)!r}"
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise error(f"{where}: {p.stat().st_size} bytes, larger than any config ({MAX_FILE_BYTES} max)")
        raw = p.read_bytes()
    except OSError as e:
        raise error(f"{where}: {e.strerror or one_line(e)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); expected YAML") \
            from None
    return parse_yaml(text, where, error)


def parse_yaml(text: str, where: str, error: type[Exception]):
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise error(f"{where}: not valid YAML{pos}: {one_line(e.problem or e.context or 'syntax error')}") from None
    except yaml.reader.ReaderError as e:
        raise error(f"{where}: not valid YAML: unacceptable character #x{e.character:04x} at offset "
                    f"{e.position}") from None
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML: {one_line(e)}") from None
    except RecursionError:
        raise error(f"{where}: not valid YAML: nested too deeply") from None


def mapping(where: str, d, error: type[Exception]) -> dict:
    if not isinstance(d, dict):
        got = "an empty file" if d is None else type(d).__name__
        raise error(f"{where}: expected a mapping of fields, got {got}")
    return d


# ---- values ------------------------------------------------------------------------------------------------
def check_int(where: str, v, error: type[Exception], lo: int = 1, hi: int = MAX_INT) -> int:
    """An int (a YAML bool is not one) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise error(f"{where}: must be an integer in [{lo}, {hi}], got {_short(v)}")
    return v


def check_number(where: str, v, error: type[Exception], lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite int or float (never a bool, NaN or inf) in the interval lo..hi (closed unless *_open)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise error(f"{where}: must be a number, got {_short(v)}")
    x = float(v) if not isinstance(v, int) or abs(v) < 2**1000 else math.inf
    if not math.isfinite(x):
        raise error(f"{where}: must be a finite number, got {_short(v)}")
    below = lo is not None and (x <= lo if lo_open else x < lo)
    above = hi is not None and (x >= hi if hi_open else x > hi)
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        interval = f"{left}{'-inf' if lo is None else _g(lo)}, {'inf' if hi is None else _g(hi)}{right}"
        raise error(f"{where}: must be in {interval}, got {_short(v)}")
    return x


def check_bool(where: str, v, error: type[Exception]) -> bool:
    if not isinstance(v, bool):
        raise error(f"{where}: must be true or false, got {_short(v)}")
    return v


def check_str(where: str, v, error: type[Exception], nonempty: bool = True) -> str:
    if not isinstance(v, str) or (nonempty and not v.strip()):
        raise error(f"{where}: must be a{' non-empty' if nonempty else ''} string, got {_short(v)}")
    return v


def _g(x: float) -> str:
    return f"{x:g}"


def _short(v) -> str:
    s = one_line(repr(v))
    return s if len(s) <= 60 else s[:57] + "..."
