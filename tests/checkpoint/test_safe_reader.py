"""A crafted DCP checkpoint cannot run code: its .metadata is unpickled with an allow-list, and entries that DCP
would read with torch.load(weights_only=False) are refused (meshplan/runtime/checkpoint_reader.py)."""
import os
import pickle

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from meshplan.runtime import checkpoint as ckpt
from meshplan.runtime.checkpoint_reader import read_metadata


def test_crafted_metadata_runs_no_code(tmp_path, code_running_pickle):
    marker = str(tmp_path / "pwned")
    step = tmp_path / "step_000001"
    step.mkdir()
    (step / ".metadata").write_bytes(pickle.dumps(Metadata({"model.w": code_running_pickle(marker)})))
    with pytest.raises(ValueError, match=r"\.metadata: not a DCP checkpoint of tensors .*posix.mkdir"):
        read_metadata(step)
    with pytest.raises(ValueError, match="not a DCP checkpoint of tensors"):
        ckpt.export(step, tmp_path / "full.pt")
    assert not os.path.exists(marker)


def test_pickled_entries_are_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Metadata({"extra": BytesStorageMetadata()})))
    with pytest.raises(ValueError, match="BytesStorageMetadata is not a DCP metadata class"):
        read_metadata(tmp_path)


def test_a_real_checkpoint_reads(tmp_path):
    """DCP's own writer, no process group: every class it pickles is on the allow-list."""
    import torch.distributed.checkpoint as dcp

    sd = {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3)}
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    meta = read_metadata(tmp_path)
    assert {k: tuple(v.size) for k, v in meta.state_dict_metadata.items()} == {"w": (2, 3), "step": ()}
    out = torch.load(ckpt.export(tmp_path, tmp_path / "full.pt"), weights_only=True)
    assert torch.equal(out["w"], sd["w"]) and int(out["step"]) == 3
