"""Low-rank directions on DTensor parameters (issue 21, item 4), 2 gloo processes: a ``Shard(0)`` rank (FSDP2, TP
column-parallel) updates its rows with its rows of U and all of V, a ``Shard(1)`` rank (TP row-parallel) the
reverse, and for the same g every layout lands on the single-process weights bit for bit (in place with fp32 and
with bf16 masters; TP also with the forward-side virtual path, whose sharded weights are materialised)."""
import pytest
import torch
import torch.distributed as dist

from dtensor_cases import equal_states, full_state, perturbed_full, shard, spawn_results, stack, train_fixed
from mezo_kernels.optim import MeZO, replay

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

LOW = dict(distribution="lowrank", lowrank_r=2)
CASES = [("fsdp", "inplace", torch.float32), ("fsdp", "inplace", torch.bfloat16),
         ("tp", "inplace", torch.float32), ("tp", "virtual", torch.bfloat16)]


def _worker(rank, world, out):
    res = {}
    m = shard(stack(), "tp", world)
    res["z"] = perturbed_full(m, MeZO(m.named_parameters(), model=m, lr=0.1, eps=1e-2, seed=11, perturb="inplace",
                                      **LOW), 123)
    for kind, perturb, dtype in CASES:
        m = shard(stack(dtype), kind, world)
        opt = train_fixed(m, perturb=perturb, **LOW)
        res[kind, perturb, dtype] = full_state(m), opt.log
    m = shard(stack(), "fsdp", world)
    replay(m.named_parameters(), res["fsdp", "inplace", torch.float32][1], model=m)
    res["replay"] = full_state(m)
    if rank == 0:
        torch.save(res, out)


@pytest.fixture(scope="module")
def got(tmp_path_factory):
    return spawn_results(tmp_path_factory, "lowrank_dtensor", _worker, 2)


def test_sharded_lowrank_z_is_the_single_process_z(got):
    m = stack()
    opt = MeZO(m.named_parameters(), model=m, lr=0.1, eps=1e-2, seed=11, perturb="inplace", **LOW)
    assert len(opt.param_sets[0].lowrank.entries) == 2          # both Linear weights are low-rank
    assert equal_states(got["z"], perturbed_full(m, opt, 123)) == []


@pytest.mark.parametrize("kind, perturb, dtype", CASES)
def test_same_g_gives_the_single_process_weights_bit_for_bit(got, kind, perturb, dtype):
    m = stack(dtype)
    opt = train_fixed(m, perturb=perturb, **LOW)
    state, log = got[kind, perturb, dtype]
    assert log == opt.log and log.config == opt.log.config
    assert equal_states(state, full_state(m)) == []
    assert not torch.equal(full_state(m)["0.weight"], full_state(stack(dtype))["0.weight"])   # it moved


def test_sharded_log_replays_on_shards_and_on_one_process(got):
    state, log = got["fsdp", "inplace", torch.float32]
    assert equal_states(got["replay"], state) == []
    m = stack()
    replay(m.named_parameters(), log, model=m)
    assert equal_states(full_state(m), state) == []
