"""redistribute() between every pair of placements on a 2-D mesh: values forward, gradients backward.

The gradient convention (collectives.py): a Shard value has a Shard gradient, a Partial value a Replicate
gradient, a Replicate value a Partial gradient. So the test seeds each output with the convention's gradient of a
known upstream G and checks the input gradients: exact shards of G where the input was sharded, all of G where it
was Partial, and summands that add up (over the axes where the input was replicated) to G.
"""
import itertools

import torch

from meshplan.ir import Mesh
from meshplan.ir.placement import Partial, Replicate, Shard
from meshplan.runtime import LocalWorld
from meshplan.runtime.redistribute import plan_steps, redistribute

MESH = Mesh.of(dp=2, mp=2)
SHAPE = (4, 8, 3)
FACTORS = (0.75, 0.25)  # summands of a Partial value: exact in binary floating point
CHOICES = (Shard(0), Shard(1), Replicate(), Partial())


def _local(full: torch.Tensor, placements, coords, partial_as_sum: bool) -> torch.Tensor:
    """This rank's piece of `full`. Partial axes hold a summand (partial_as_sum) or, for gradients, all of it."""
    x = full
    for (axis, n), p in zip(MESH.axes, placements):
        c = coords[axis]
        if isinstance(p, Shard):
            x = x.chunk(n, p.dim)[c]
        elif isinstance(p, Partial) and partial_as_sum:
            x = x * FACTORS[c]
    return x


def _grad_placement(p):
    return Replicate() if isinstance(p, Partial) else Partial() if isinstance(p, Replicate) else p


PAIRS = [(src, dst) for src in itertools.product(CHOICES, repeat=2) for dst in itertools.product(CHOICES, repeat=2)
         if all(not isinstance(d, Partial) or isinstance(s, Partial) for s, d in zip(src, dst))]


def test_every_pair_of_placements_forward_and_backward():
    world = LocalWorld(MESH.size, timeout_s=30)
    groups = world.groups(MESH)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    G = torch.randn(SHAPE, generator=gen, dtype=torch.float64)

    def rank(r):
        coords = MESH.coords(r)
        out = []
        for src, dst in PAIRS:
            x = _local(X, src, coords, True).clone().requires_grad_(True)
            y = redistribute(x, src, dst, groups[r].ordered(), op="test")
            seed = _local(G, [_grad_placement(p) for p in dst], coords, True)
            (y * seed).sum().backward()
            out.append((y.detach(), x.grad))
        return out

    results = world.run(rank)
    for i, (src, dst) in enumerate(PAIRS):
        for r in range(MESH.size):
            coords = MESH.coords(r)
            y, _ = results[r][i]
            assert torch.allclose(y, _local(X, dst, coords, True)), (src, dst, r)
        # input gradients: summed over the axes the input was replicated on, they are G's piece for this rank
        replicated = [a for (a, _), p in zip(MESH.axes, src) if isinstance(p, Replicate)]
        for r in range(MESH.size):
            coords = MESH.coords(r)
            peers = [q for q in range(MESH.size)
                     if all(MESH.coords(q)[a] == coords[a] for a in MESH.names if a not in replicated)]
            total = sum(results[q][i][1] for q in peers)
            expected = _local(G, [Replicate() if isinstance(p, Partial) else p for p in src], coords, False)
            assert torch.allclose(total, expected), (src, dst, r)


def test_plan_steps_prefers_direct_collectives():
    s0, s1, r, p = Shard(0), Shard(1), Replicate(), Partial()
    assert plan_steps((s0, s1), (s0, r), (2, 2)) == [(1, s1, r)]  # Megatron-SP all-gather
    assert plan_steps((s0, p), (s0, s1), (2, 2)) == [(1, p, s1)]  # reduce-scatter
    assert plan_steps((s0, s1), (s0, s0), (2, 2)) == [(1, s1, s0)]  # one all-to-all
    assert plan_steps((s0, r), (r, s0), (2, 2)) == [(0, s0, r), (1, r, s0)]  # gather before slicing
    assert plan_steps((s1, s1), (s1, s1), (1, 2)) == []
    assert plan_steps((p, s1), (r, s1), (1, 2)) == []  # size-1 axes are ignored
    # swapping batch and sequence shards between two axes has no direct order: through replicate, still correct
    steps = plan_steps((s0, s1), (s1, s0), (2, 2))
    assert steps[-1][2] in (s0, s1) and len(steps) >= 3
