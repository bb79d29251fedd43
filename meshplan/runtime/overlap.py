"""Run a ParallelModel's chunked ops through the code codegen emits for its overlap schedule.

    pm = ParallelModel(model, plan, groups=...)
    enable_overlap(pm, batch=8, seq=64, chunks=2)     # emit, write to the cache dir, import, install
    loss_of(pm(tokens), targets).backward()             # the same loss and gradients, forward overlapped

The emitted module is plain source in a file named by the hash of its text (so a plan, batch, seq and chunk
count emit and import once per process, and the file is there to read), imported with importlib, and its `OPS`
(op name -> function(ctx, x)) installed as the model's op_overrides. Every other op runs as before.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from ..codegen.durations import Durations
from ..codegen.emit import emit_module
from .executor import ParallelModel

_LOADED: dict[str, ModuleType] = {}
_LOCK = threading.Lock()  # the ranks of an in-process world load the same module at once


def cache_dir() -> Path:
    """$MESHPLAN_CACHE/emitted, else <tmp>/meshplan-emitted."""
    root = os.environ.get("MESHPLAN_CACHE")
    return Path(root, "emitted") if root else Path(tempfile.gettempdir(), "meshplan-emitted")


def load_emitted(source: str, directory: str | Path | None = None) -> ModuleType:
    """Write `source` to <directory>/overlap_<hash>.py (once) and import it (once per process)."""
    with _LOCK:
        return _load(source, directory)


def _load(source: str, directory: str | Path | None) -> ModuleType:
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    name = f"meshplan_emitted_overlap_{digest}"
    if name in _LOADED:
        return _LOADED[name]
    path = Path(directory) if directory is not None else cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    file = path / f"overlap_{digest}.py"
    if not file.exists() or file.read_text() != source:
        tmp = file.with_suffix(f".{os.getpid()}.tmp")  # concurrent rank processes: write aside, rename atomically
        tmp.write_text(source)
        tmp.replace(file)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    _LOADED[name] = module
    return module


def enable_overlap(pm: ParallelModel, batch: int, seq: int, chunks: int = 2, durations: Durations | str = "local",
                   directory: str | Path | None = None) -> ModuleType:
    """Emit the overlap program of pm's plan for this global batch and sequence length and install it in pm.
    Returns the imported module (its __file__ is the emitted source)."""
    module = load_emitted(emit_module(pm.graph, pm.plan, batch, seq, chunks, durations), directory)
    pm.op_overrides.update(module.OPS)
    return module


def disable_overlap(pm: ParallelModel) -> None:
    pm.op_overrides.clear()
