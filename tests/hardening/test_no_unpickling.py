"""Nothing is unpickled: a crafted checkpoint cannot run code, RNG states survive weights_only loading, the
emitted overlap code runs from memory, and an --out that holds a run is never silently replaced."""
import os
import random

import numpy as np
import pytest
import torch

from meshplan.cli_args import UsageError
from meshplan.rl import checkpoint as ckpt_io
from meshplan.rl.cli import prepare_out
from meshplan.rl.config import RLConfigError
from meshplan.runtime.overlap import load_emitted


def test_a_crafted_checkpoint_is_refused_without_running_code(tmp_path, code_running_pickle):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "evil": code_running_pickle(marker)}, path)
    with pytest.raises(RLConfigError, match="checkpoint.pt.*not a meshplan checkpoint"):
        ckpt_io.load(path)
    assert not os.path.exists(marker)
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a zip")
    with pytest.raises(RLConfigError, match="garbage.pt"):
        ckpt_io.load(tmp_path / "garbage.pt")


def test_rng_states_round_trip_through_weights_only(tmp_path):
    torch.manual_seed(3), random.seed(4), np.random.seed(5)
    random.gauss(0, 1)  # a cached gaussian in python's state
    np.random.standard_normal()
    ckpt_io.save_atomic({"rng": ckpt_io.rng_state()}, tmp_path / "c.pt")
    expected = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ckpt_io.set_rng_state(ckpt_io.load(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())
    assert torch.equal(expected[0], got[0]) and expected[1:3] == got[1:3]
    assert np.array_equal(expected[3], got[3]) and expected[4] == got[4]


def test_out_holding_a_run_is_refused_and_partial_saves_removed(tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    (ckpts / "step_000004").mkdir(parents=True)
    (ckpts / "step_000004" / "trainer.pt").write_bytes(b"x")
    (out / "metrics.jsonl").write_text('{"step": 4}\n')
    partial = ckpts / ".tmp_step_000006"  # a save that died before its rename
    (partial / "actor").mkdir(parents=True)
    with pytest.raises(UsageError, match="already holds a run .*checkpoints.*--resume.*--overwrite"):
        prepare_out(out, resume=False, overwrite=False)
    assert (out / "metrics.jsonl").read_text() == '{"step": 4}\n' and partial.exists()
    prepare_out(out, resume=True, overwrite=False)
    assert ckpt_io.latest_step(out) == ckpts / "step_000004" and not partial.exists()
    prepare_out(out, resume=False, overwrite=True)
    assert not (out / "metrics.jsonl").exists() and not ckpts.exists()
    prepare_out(tmp_path / "fresh", resume=False, overwrite=False)  # a new directory is fine


def test_stale_cache_temps_removed(tmp_path):
    """The warm-up cache is still one save_atomic file: a dead writer's temporary file is removed, a live one's
    is kept."""
    dead = 2**22 + 7  # above the default pid_max: no such process
    stale, live = tmp_path / f".warmup-x.pt.tmp{dead}", tmp_path / f".warmup-x.pt.tmp{os.getppid()}"
    stale.write_bytes(b"half"), live.write_bytes(b"writing")
    assert ckpt_io.remove_stale_temps(tmp_path) == [stale] and live.exists()


def test_emitted_code_runs_from_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    source = "OPS = {}\n\ndef twice(x):\n    return 2 * x\n\nVALUE = twice(21)\n"
    module = load_emitted(source)
    assert module.VALUE == 42 and module.__file__.startswith("<")
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing to swap
    broken = load_emitted("OPS = {}\n\ndef f():\n    raise ValueError('line 4')\n")
    with pytest.raises(ValueError) as e:
        broken.f()
    assert "raise ValueError('line 4')" in "".join(e.traceback[-1].statement.lines)
