"""A device mesh: named axes with sizes, outermost first; ranks are laid out row-major over the axes."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Mesh:
    axes: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        names = [n for n, _ in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"mesh.axes: duplicate axis name in {names}")
        for name, size in self.axes:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"mesh.axes: axis name {name!r} must be an identifier")
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"mesh.axes.{name}: size must be a positive integer, got {size!r}")

    @classmethod
    def of(cls, **axes: int) -> "Mesh":
        """Mesh.of(dp=2, mp=4): keyword order is axis order, outermost first."""
        return cls(tuple(axes.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s for _, s in self.axes)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def axis_size(self, name: str) -> int:
        for n, s in self.axes:
            if n == name:
                return s
        raise KeyError(f"mesh has no axis {name!r} (axes: {list(self.names)})")

    def index(self, name: str) -> int:
        return self.names.index(name)

    def coords(self, rank: int) -> dict[str, int]:
        """Rank -> its coordinate on each axis (row-major, last axis fastest)."""
        out = {}
        for name, size in reversed(self.axes):
            out[name] = rank % size
            rank //= size
        return {n: out[n] for n in self.names}

    def groups(self, name: str) -> list[list[int]]:
        """The rank groups along one axis: ranks that differ only in their coordinate on `name`."""
        i = self.index(name)
        stride = math.prod(self.shape[i + 1 :])
        groups = []
        for rank in range(self.size):
            if self.coords(rank)[name] == 0:
                groups.append([rank + j * stride for j in range(self.shape[i])])
        return groups

    def to_dict(self) -> dict[str, int]:
        return dict(self.axes)

    @classmethod
    def from_dict(cls, d: dict) -> "Mesh":
        if not isinstance(d, dict) or not d:
            raise ValueError(f"mesh: expected a non-empty mapping axis -> size, got {d!r}")
        return cls(tuple((str(k), v) for k, v in d.items()))

    def __str__(self) -> str:
        return "(" + ", ".join(f"{n}={s}" for n, s in self.axes) + ")"
