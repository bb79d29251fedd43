"""Read DCP checkpoints without unpickling arbitrary objects.

torch's FileSystemReader reads a checkpoint's `.metadata` with `pickle.load`, and its default load planner reads
non-tensor entries with `torch.load(weights_only=False)` (torch 2.13, torch/distributed/checkpoint/filesystem.py
read_metadata, default_planner.py load_bytes): a crafted checkpoint would run code on load. SafeReader unpickles
the metadata with an allow-list of the classes DCP writes (the metadata dataclasses, torch.Size, dtypes,
layouts, paths) and refuses any entry that is not a tensor, so only tensor data is read, and that through
`torch.load(weights_only=True)` (docs/reference.md, "Distributed checkpoints").
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING", "MetadataIndex",
                                              "StorageMeta"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "Path", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                 torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")


def read_metadata(path: str | Path) -> Metadata:
    """The `.metadata` of the DCP checkpoint at `path`, every entry a tensor; a ValueError naming the file
    otherwise."""
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"checkpoint {file}: not a DCP checkpoint of tensors ({e})") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"checkpoint {file}: not a DCP checkpoint (holds a {type(metadata).__name__})")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise ValueError(f"checkpoint {file}: entry {key!r} is not a tensor ({type(entry).__name__}); "
                             f"meshplan reads tensors only")
    return metadata


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata comes from read_metadata above."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise ValueError("checkpoint: per-rank metadata files are not read")
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
