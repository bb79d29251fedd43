"""meshplan placements convert to torch.distributed.tensor's and back without loss."""
import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.tensor import Partial as TPartial
from torch.distributed.tensor import Replicate as TReplicate
from torch.distributed.tensor import Shard as TShard

from meshplan.ir.placement import Partial, Replicate, Shard, parse_placement
from meshplan.runtime.torch_placements import from_torch, placements_from_torch, placements_to_torch, to_torch

PLACEMENT = st.one_of(st.builds(Shard, st.integers(0, 3)), st.just(Replicate()),
                      st.builds(Partial, st.sampled_from(["sum", "avg"])))


@given(st.lists(PLACEMENT, min_size=1, max_size=4))
def test_round_trip_and_same_string(placements):
    theirs = placements_to_torch(placements)
    assert placements_from_torch(theirs) == tuple(placements)
    for ours, t in zip(placements, theirs):
        assert str(t) == str(ours) and parse_placement(str(t)) == ours  # plan YAML reads torch's strings too


def test_classes_and_negative_dims():
    assert to_torch(Shard(-1), ndim=3) == TShard(2) and to_torch(Replicate()) == TReplicate()
    assert to_torch(Partial("avg")) == TPartial("avg")
    with pytest.raises(ValueError, match="needs the tensor's rank"):
        to_torch(Shard(-1))
    with pytest.raises(ValueError, match="Partial.reduce_op: must be 'sum' or 'avg', got 'max'"):
        from_torch(TPartial("max"))
