"""CommStats: the bytes this rank sends, per collective kind, op and phase, counted at each call.

Volumes are those of the bandwidth-optimal algorithms (what a ring or pairwise exchange sends), from the local
tensor sizes of each call, with n ranks on the axis:
  all_gather of a local chunk c:           (n-1)·c        reduce_scatter of a full buffer N:  (n-1)/n·N
  all_reduce of N:                         2·(n-1)/n·N    all_to_all of a buffer N (even):    (n-1)/n·N
  all_to_all with uneven splits:           the rows sent to the other ranks (what this rank does not keep)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

FWD, BWD, GRAD = "fwd", "bwd", "grad"


@dataclass(frozen=True)
class Key:
    kind: str  # all_gather | reduce_scatter | all_reduce | all_to_all
    op: str  # the IR op (or "dp_grads" for gradient buckets)
    tag: str  # which of the op's collectives: in0, qkv_a2a, dispatch, combine, counts, capacity, grad, ...
    phase: str  # fwd | bwd | grad
    axis: str


class CommStats:
    def __init__(self) -> None:
        self.bytes: dict[Key, int] = defaultdict(int)
        self.calls: dict[Key, int] = defaultdict(int)
        self.enabled = True

    def add(self, key: Key, nbytes: int) -> None:
        if self.enabled:
            self.bytes[key] += int(nbytes)
            self.calls[key] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    # ---- views ------------------------------------------------------------------------------------------
    def _sum(self, field: str, **match) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for k, v in self.bytes.items():
            out[getattr(k, field)] += v
        return dict(out)

    def by_kind(self) -> dict[str, int]:
        return self._sum("kind")

    def by_op(self) -> dict[str, int]:
        return self._sum("op")

    def by_phase(self) -> dict[str, int]:
        return self._sum("phase")

    def total(self, *, op: str | None = None, tag: str | None = None, phase: str | None = None,
              kind: str | None = None, prefix: str | None = None) -> int:
        """Bytes sent, filtered by any of: op name, op-name prefix, tag, phase, kind."""
        return sum(v for k, v in self.bytes.items()
                   if (op is None or k.op == op) and (tag is None or k.tag == tag)
                   and (phase is None or k.phase == phase) and (kind is None or k.kind == kind)
                   and (prefix is None or k.op.startswith(prefix)))

    def n_calls(self, **filters) -> int:
        keys = [k for k in self.calls if all(getattr(k, f) == v for f, v in filters.items())]
        return sum(self.calls[k] for k in keys)

    def table(self) -> str:
        rows = sorted(self.bytes.items(), key=lambda kv: (kv[0].phase, kv[0].op, kv[0].tag))
        lines = [f"{'phase':5} {'op':32} {'tag':10} {'kind':15} {'axis':5} {'calls':>5} {'bytes':>12}"]
        for k, v in rows:
            lines.append(f"{k.phase:5} {k.op:32} {k.tag:10} {k.kind:15} {k.axis:5} {self.calls[k]:5d} {v:12d}")
        lines.append(f"total bytes sent by this rank: {sum(self.bytes.values())}")
        return "\n".join(lines)
