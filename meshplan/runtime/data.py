"""Per-rank data: each rank reads only its shard of every global batch, cut as the plan's first op wants it.

A TokenStream is one long sequence of token ids: a file (numpy .npy, or raw little-endian uint16 / int32 as
nanoGPT writes them; memory-mapped, never unpickled) or a synthetic stream (sample i drawn from a generator
seeded by (seed, i), so any rank can draw any sample alone). Sample i is the window [i·S, i·S + S + 1): S
inputs and the S next-token targets.

ShardedLoader is DistributedSampler's contract at the granularity meshplan needs: the global batch of step k is
samples order[k·B .. k·B + B) (order: a seeded permutation per epoch for a file), and each rank yields the rows
(Shard(0): data-parallel axes) and columns (Shard(1): a sequence-parallel model axis) of its shard under
ParallelModel.input_placement(); ranks that replicate the tokens read the same shard. Nothing is broadcast.
`global_batch(k)` is the same step whole, for the one-process reference (`meshplan run --check`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..ir.placement import Placement, Shard
from .process_groups import AxisGroup

RAW_DTYPES = {"uint16": np.uint16, "int32": np.int32}


class DataError(ValueError):
    """The token data does not fit the run; the message names the file or field and the constraint."""


class TokenStream:
    def __init__(self, ids: np.ndarray | None, vocab_size: int, seed: int = 0, name: str = "synthetic"):
        self.ids, self.vocab_size, self.seed, self.name = ids, vocab_size, seed, name

    @classmethod
    def synthetic(cls, vocab_size: int, seed: int = 0) -> "TokenStream":
        return cls(None, vocab_size, seed)

    @classmethod
    def from_file(cls, path: str | Path, vocab_size: int, dtype: str = "uint16") -> "TokenStream":
        """A .npy array of integer ids (1-D), or any other file as raw ids of `dtype` (uint16 or int32)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"data: {path} is not a file")
        if path.suffix == ".npy":
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            if dtype not in RAW_DTYPES:
                raise DataError(f"data.dtype: {dtype!r} is not a raw token format (use {', '.join(RAW_DTYPES)})")
            ids = np.memmap(path, dtype=RAW_DTYPES[dtype], mode="r")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"data: {path} holds {ids.dtype} of shape {ids.shape}; expected a 1-D array of token ids")
        return cls(ids, vocab_size, name=str(path))

    def n_samples(self, seq: int) -> int | None:
        """Whole windows of seq + 1 ids in the file (None: the synthetic stream is endless)."""
        return None if self.ids is None else (len(self.ids) - 1) // seq

    def window(self, i: int, seq: int, cols: tuple[int, int]) -> torch.Tensor:
        """Ids [c0, c1 + 1) of sample i (inputs c0..c1-1 and their targets), as int64."""
        c0, c1 = cols
        if self.ids is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            return torch.randint(0, self.vocab_size, (seq + 1,), generator=gen)[c0 : c1 + 1]
        out = torch.from_numpy(np.array(self.ids[i * seq + c0 : i * seq + c1 + 1], dtype=np.int64))
        bad = out >= self.vocab_size
        if bad.any() or (out < 0).any():
            raise DataError(f"data: {self.name} has token id {int(out[bad | (out < 0)][0])} near position "
                            f"{i * seq + c0}, outside model.vocab_size={self.vocab_size}")
        return out


def shard_range(size: int, dim: int, placement: tuple[Placement, ...], axes: list[AxisGroup],
                what: str) -> tuple[int, int]:
    """[lo, hi) of `size` that this rank holds on dimension `dim` (outer axes split first, as redistribute does)."""
    lo, hi = 0, size
    for g, p in zip(axes, placement):
        if isinstance(p, Shard) and p.dim == dim and g.size > 1:
            if (hi - lo) % g.size:
                raise DataError(f"data: mesh axis {g.name}={g.size} does not divide the {what} {hi - lo}")
            step = (hi - lo) // g.size
            lo, hi = lo + g.index * step, lo + (g.index + 1) * step
    return lo, hi


class ShardedLoader:
    def __init__(self, stream: TokenStream, batch: int, seq: int, placement: tuple[Placement, ...],
                 axes: list[AxisGroup], seed: int = 0):
        n = stream.n_samples(seq)
        if n is not None and n < 1:
            raise DataError(f"data: {stream.name} has fewer than seq + 1 = {seq + 1} tokens")
        self.stream, self.batch, self.seq, self.seed, self.n = stream, batch, seq, seed, n
        self.rows = shard_range(batch, 0, placement, axes, "batch size")
        self.cols = shard_range(seq, 1, placement, axes, "sequence length")
        self._perm: tuple[int, torch.Tensor | None] = (-1, None)

    def sample(self, position: int) -> int:
        """The sample at this position of the stream's order: a fresh permutation of the file every epoch."""
        if self.n is None:
            return position
        epoch, k = divmod(position, self.n)
        if self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return int(self._perm[1][k])

    def batch_at(self, step: int, rows: tuple[int, int] | None = None,
                 cols: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets) of this rank's shard of step `step`'s global batch."""
        (r0, r1), c = rows or self.rows, cols or self.cols
        data = torch.stack([self.stream.window(self.sample(step * self.batch + r), self.seq, c) for r in range(r0, r1)])
        return data[:, :-1], data[:, 1:]

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch_at(step, (0, self.batch), (0, self.seq))
