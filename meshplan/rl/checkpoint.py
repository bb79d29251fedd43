"""Atomic checkpoints and the RNG states a bit-identical resume needs."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


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
    # weights_only=False: the checkpoint holds python/numpy RNG states, which are not tensors
    return torch.load(path, map_location="cpu", weights_only=False)
