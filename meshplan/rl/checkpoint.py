"""Atomic checkpoints and the RNG states a bit-identical resume needs; nothing is ever unpickled.

Checkpoints and the warm-up cache hold only tensors and plain containers of numbers and strings (the RNG states
are converted to tensors), so `load` reads them with torch.load(weights_only=True): a crafted file cannot run
code, it can only fail to load (one line naming the file).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from .config import RLConfigError

_TMP = re.compile(r"^\..+\.tmp(\d+)$")  # save_atomic's temporary name: .<name>.tmp<pid>


def rng_state() -> dict:
    """torch, python and numpy global RNG states, as tensors and numbers only."""
    version, mt, gauss = random.getstate()
    key, words, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"key": str(key), "state": torch.from_numpy(words.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(cached)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def save_atomic(obj, path: str | Path) -> None:
    """Write to a temporary file in the same directory, fsync, then os.replace: a crash mid-write leaves the
    previous checkpoint intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> dict:
    """A checkpoint or cache file, read with weights_only=True (tensors and plain data only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise RLConfigError(f"checkpoint {str(path)!r}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RLConfigError(f"checkpoint {str(path)!r}: not a meshplan checkpoint ({type(e).__name__}: "
                            f"{first[:160]})") from None


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete save_atomic's leftovers (.<name>.tmp<pid>) whose writer is no longer running; returns them."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TMP.match(p.name)
        if m and p.is_file() and not _running(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is starting: whatever it left earlier is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
