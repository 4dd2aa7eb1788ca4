"""The single-process side of sharded parameters: a block of a tensor as runs of global indices (what every
DTensor layout reduces to), the placements MeZO reads through ``_compat``, and the loss-group argument. The
multi-process runs are in test_dtensor.py and test_dtensor_tp.py."""
import itertools
import random

import pytest
import torch

from mezo_kernels import _compat
from mezo_kernels.optim import MeZO
from mezo_kernels.optim.shard import local_runs


def _brute(full, shape, offset):
    idx = torch.arange(int(torch.tensor(full).prod()) if full else 1).view(full)
    block = idx[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    return block.reshape(-1)


@pytest.mark.parametrize("case", range(40))
def test_local_runs_cover_exactly_the_global_indices_of_the_block(case):
    rnd = random.Random(case)
    full = tuple(rnd.randint(1, 5) for _ in range(rnd.randint(1, 4)))
    shape = tuple(rnd.randint(0, f) for f in full)
    offset = tuple(rnd.randint(0, f - n) for f, n in zip(full, shape))
    runs = local_runs(full, shape, offset)
    want = _brute(full, shape, offset)
    got = torch.cat([torch.arange(g, g + n) for _, n, g in runs]) if runs else torch.zeros(0, dtype=torch.int64)
    assert torch.equal(got, want)
    starts = [a for a, _, _ in runs]              # the runs tile the local tensor in order
    assert starts == list(itertools.accumulate([0] + [n for _, n, _ in runs]))[:len(runs)]
    partial = [d for d in range(len(full)) if shape[d] != full[d]]
    if runs and partial:            # prod(local_shape[:d]) runs of local_shape[d] * prod(full_shape[d+1:])
        d = partial[-1]
        assert len(runs) == _prod(shape[:d])
        assert {n for _, n, _ in runs} == {shape[d] * _prod(full[d + 1:])}


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


def test_local_runs_of_row_column_whole_and_empty_blocks():
    assert local_runs((7, 5), (3, 5), (4, 0)) == [(0, 15, 20)]               # Shard(0): one run
    assert local_runs((3, 10), (3, 5), (0, 5)) == [(0, 5, 5), (5, 5, 15), (10, 5, 25)]   # Shard(1): a run a row
    assert local_runs((4,), (4,), (0,)) == [(0, 4, 0)] and local_runs((), (), ()) == [(0, 1, 0)]
    assert local_runs((4, 2), (0, 2), (4, 0)) == []
    with pytest.raises(ValueError, match="outside"):
        local_runs((4, 2), (3, 2), (2, 0))


def test_placements_read_through_compat():
    from torch.distributed.tensor import Partial, Replicate, Shard
    assert _compat.placement_kind(Shard(1)) == ("shard", 1, 1)
    assert _compat.placement_kind(Replicate()) == ("replicate", None, 1)
    assert _compat.placement_kind(Partial()) == ("partial", None, 1)
    assert _compat.placement_kind(object()) == ("other", None, 1)
    assert not _compat.is_dtensor(torch.zeros(2)) and not _compat.is_dtensor(None)
    assert _compat.fsdp_modules(torch.nn.Linear(2, 2)) == []


def test_loss_group_in_one_process():
    p = [torch.zeros(3, requires_grad=True)]
    assert MeZO(p, lr=0.1).loss_group is None and MeZO(p, lr=0.1, loss_group=False).loss_group is None
    with pytest.raises(TypeError, match="loss_group must be"):
        MeZO(p, lr=0.1, loss_group=True)
    with pytest.raises(TypeError, match="loss_group must be"):
        MeZO(p, lr=0.1, loss_group="world")
