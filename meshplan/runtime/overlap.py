"""Run a ParallelModel's chunked ops through the code codegen emits for its overlap schedule.

    pm = ParallelModel(model, plan, groups=...)
    enable_overlap(pm, batch=8, seq=64, chunks=2)     # emit, compile in memory, install
    loss_of(pm(tokens), targets).backward()             # the same loss and gradients, forward overlapped

The emitted module is plain source, compiled from memory once per process (keyed by the hash of its text) and
never executed from a file (a shared temp directory would let another user swap the code); `directory=` also
writes a copy to read. Its `OPS` (op name -> function(ctx, x)) become the model's op_overrides. Every other op
runs as before.
"""
from __future__ import annotations

import hashlib
import linecache
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

from ..codegen.durations import Durations
from ..codegen.emit import emit_module
from .executor import ParallelModel

_LOADED: dict[str, ModuleType] = {}
_LOCK = threading.Lock()  # the ranks of an in-process world load the same module at once


def load_emitted(source: str, directory: str | Path | None = None) -> ModuleType:
    """Compile and import `source` from memory (once per process). Nothing is executed from a file: with
    `directory`, a copy is written to <directory>/overlap_<hash>.py for reading (the module's __file__), but
    the code that runs is the string codegen produced; tracebacks show its lines either way (linecache)."""
    with _LOCK:
        return _load(source, directory)


def _load(source: str, directory: str | Path | None) -> ModuleType:
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    name = f"meshplan_emitted_overlap_{digest}"
    if name in _LOADED:
        return _LOADED[name]
    filename = f"<meshplan emitted overlap_{digest}.py>"
    if directory is not None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        file = path / f"overlap_{digest}.py"
        tmp = file.with_suffix(f".{os.getpid()}.tmp")  # concurrent rank processes: write aside, rename atomically
        tmp.write_text(source)
        tmp.replace(file)
        filename = str(file)
    module = ModuleType(name)
    module.__file__ = filename
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    sys.modules[name] = module  # dataclasses and pickling by reference look the module up here
    exec(compile(source, filename, "exec"), module.__dict__)  # noqa: S102 - meshplan's own generated code
    _LOADED[name] = module
    return module


def enable_overlap(pm: ParallelModel, batch: int, seq: int, chunks: int = 2, durations: Durations | str = "local",
                   directory: str | Path | None = None) -> ModuleType:
    """Emit the overlap program of pm's plan for this global batch and sequence length and install it in pm.
    Returns the imported module (its __file__ is the emitted source)."""
    module = load_emitted(emit_module(pm.graph, pm.plan, batch, seq, chunks, durations), directory)
    pm.op_overrides.update(module.OPS)
    return module
