"""Run checkpoints (DCP step directories) and the RNG states a bit-identical resume needs; nothing is ever
unpickled.

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


# ---- run checkpoints: DCP shards of the policy and the critic, plus the trainer's state ---------------------------
# out/checkpoints/step_000004/
#     actor/step_000004/   DCP (runtime/checkpoint.py): every rank's shards of the policy and its AdamW state
#     critic/step_000004/  the same for the value model (absent without a critic)
#     trainer.pt           counters, per-rank RNG states, the prompt stream (tensors and numbers only)
# All of it is written into .tmp_step_000004/ and renamed into place by rank 0 once complete, so a step directory
# is complete or absent; the newest KEEP are kept.
KEEP = 2
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def latest_step(out: str | Path) -> Path | None:
    """The newest complete step directory of the run in `out` (temporary ones are never returned)."""
    from ..runtime.checkpoint import latest

    return latest(checkpoint_root(out))


def save_run(out: str | Path, step: int, engines: dict, trainer_state: dict) -> Path:
    """A collective: every rank writes its shards of each engine ({"actor": e, "critic": e}); rank 0 writes
    trainer_state and renames the directory into place. An existing step directory is replaced."""
    import shutil

    import torch.distributed as dist

    from ..runtime import checkpoint as dcp_io

    root = checkpoint_root(out)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp_{name}", root / name
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    for key, engine in engines.items():
        dcp_io.save(engine.pm, engine.optimizer, tmp / key, step)
    if rank == 0:
        save_atomic(trainer_state, tmp / "trainer.pt")
        if final.exists():  # the same step saved again (a re-run phase): the new one replaces it
            old = root / f".old_{name}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        dcp_io.fsync_dir(root)
        steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())
        for p in steps[:-KEEP]:
            shutil.rmtree(p)
    dist.barrier()
    return final


def load_engines(path: Path, engines: dict) -> None:
    """Fill each engine's shards and optimizer state from the step directory `path` (a collective; any plan, as
    DCP reshards). The trainer state is path/trainer.pt (`load`)."""
    from ..runtime import checkpoint as dcp_io

    for key, engine in engines.items():
        sub = path / key / path.name
        if not sub.is_dir():
            raise RLConfigError(f"checkpoint {str(path)!r}: no {key} shards ({sub.name}/ missing)")
        dcp_io.load(engine.pm, engine.optimizer, sub)
        engine.weights_changed()


def full_weights(path: str | Path, key: str = "actor") -> dict:
    """The full tensors of one model of the step directory `path` (no process group needed): DCP exported to one
    torch.save file (dcp_to_torch_save) and read back with weights_only=True. Keys: "model.<param>", "optim...",
    "step"."""
    import tempfile

    from ..runtime.checkpoint import export

    path = Path(path)
    with tempfile.TemporaryDirectory() as d:
        nested = torch.load(export(path / key / path.name, Path(d) / "full.pt"), weights_only=True)
    return _flatten(nested)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def remove_partial_steps(out: str | Path) -> list[Path]:
    """The launcher's clean-up of saves that died before their rename (.tmp_step_*, .old_step_*)."""
    import shutil

    root = checkpoint_root(out)
    gone = [p for p in root.iterdir() if p.name.startswith((".tmp_step_", ".old_step_"))] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
