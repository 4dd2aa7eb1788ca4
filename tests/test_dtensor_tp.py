"""MeZO over DTensors beyond one mesh dim and beyond Linear stacks: a 2-d mesh on 4 gloo processes (tensor parallel
on the inner dim, FSDP2 over the outer one, FSDP2's strided shards of TP shards, uneven), and the tiny Llama on 2
processes under FSDP2 (layers and root) and under the Llama TP plan. The single-process references are computed
here."""
import pytest
import torch
import torch.distributed as dist

from dtensor_cases import (HYPER, MODES, equal_states, fixed_losses, full_state, loss_of, perturbed_full, shard,
                           spawn_results, stack, train_fixed)
from mezo_kernels import _compat
from mezo_kernels.optim import MeZO, replay
from mezo_kernels.perturb import ParamSet

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


# ----------------------------------------------------------------------------------------------- 2-d: dp x tp
def _worker_2d(rank, world, out):
    res = {}
    for dist_name in ("gaussian", "rademacher"):
        m = shard(stack(), "2d", world)
        res["z", dist_name] = perturbed_full(m, MeZO(m.named_parameters(), model=m, **HYPER,
                                                     distribution=dist_name), 123)
    for name, dtype, kw in MODES:
        m = shard(stack(dtype), "2d", world)
        opt = train_fixed(m, **kw)
        res[name] = full_state(m), opt.log
    res["placements"] = {n: [_compat.placement_kind(p) for p in q.placements] for n, q in m.named_parameters()}
    res["group"] = dist.get_process_group_ranks(opt.loss_group)
    m = shard(stack(), "2d", world)
    replay(m.named_parameters(), res["fp32"][1], model=m)
    res["replay"] = full_state(m)
    m = shard(stack(), "hsdp", world)               # HSDP: (Replicate, Shard(0)); its loss group is all 4 ranks
    opt = train_fixed(m, **MODES[0][2])
    res["hsdp"] = full_state(m), opt.log, dist.get_process_group_ranks(opt.loss_group), \
        [_compat.placement_kind(p) for p in m[0].weight.placements]
    m = shard(stack(), "2d", world)                 # the model's loss: TP's all-reduce order, so within rounding
    opt = MeZO(m.named_parameters(), model=m, **HYPER)
    with torch.no_grad():
        for _ in range(3):
            opt.step(lambda: loss_of(m, slice(4 * (rank // 2), 4 * (rank // 2) + 4)))
    res["real"] = full_state(m), opt.log
    if rank == 0:
        torch.save(res, out)


@pytest.fixture(scope="module")
def got_2d(tmp_path_factory):
    return spawn_results(tmp_path_factory, "dtensor2d", _worker_2d, 4)


def test_2d_mesh_z_and_weights_are_the_single_process_bits(got_2d):
    assert got_2d["placements"]["0.weight"] == [("strided", 0, 2), ("shard", 0, 1)]   # FSDP2 over a TP shard
    assert got_2d["placements"]["2.weight"] == [("shard", 0, 1), ("shard", 1, 1)]
    assert got_2d["group"] == [0, 2]          # the loss group is the dp dim, not the world: tp ranks share a loss
    for dist_name in ("gaussian", "rademacher"):
        m = stack()
        ps = ParamSet(list(m.named_parameters()), distribution=dist_name)
        ps.perturb_(123, 0.5)
        assert equal_states(got_2d["z", dist_name], full_state(m)) == [], dist_name
    for name, dtype, kw in MODES:
        m = stack(dtype)
        opt = train_fixed(m, **kw)
        state, log = got_2d[name]
        assert log == opt.log and equal_states(state, full_state(m)) == [], name
    assert equal_states(got_2d["replay"], got_2d["fp32"][0]) == []
    state, log, group, placements = got_2d["hsdp"]
    assert placements == [("replicate", None, 1), ("shard", 0, 1)] and group == [0, 1, 2, 3]
    assert log == got_2d["fp32"][1] and equal_states(state, got_2d["fp32"][0]) == []
    m = stack()
    replay(m.named_parameters(), got_2d["fp32"][1])
    assert equal_states(full_state(m), got_2d["fp32"][0]) == []


def test_2d_real_data_parallel_matches_one_process_within_rounding(got_2d):
    state, log = got_2d["real"]
    m = stack()
    opt = MeZO(m.named_parameters(), **HYPER)
    with torch.no_grad():
        for _ in range(3):
            opt.step(lambda: (loss_of(m, slice(0, 4)) + loss_of(m, slice(4, 8))) / 2)
    assert [r["g"] for r in log] == pytest.approx([r["g"] for r in opt.log], rel=1e-4, abs=1e-4)
    assert all(torch.allclose(state[k], v, rtol=0, atol=1e-5) for k, v in full_state(m).items())


# ----------------------------------------------------------------------------------------------- the tiny Llama
IDS = torch.randint(0, 600, (2, 12), generator=torch.Generator().manual_seed(5))


def _llama(dtype=torch.float32):
    from mezo_kernels.models import load_model
    return load_model("tiny-llama", dtype=dtype)[0]


def _llama_loss(m):
    with torch.no_grad():
        return float(m(input_ids=IDS, labels=IDS).loss)


def _llama_sharded(kind, world, dtype=torch.float32):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    m, mesh = _llama(dtype), init_device_mesh("cpu", (world,))
    if kind == "fsdp":
        for layer in m.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m
    plan = {}
    for i in range(len(m.model.layers)):
        plan.update({f"model.layers.{i}.self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")})
        plan.update({f"model.layers.{i}.mlp.{n}": ColwiseParallel() for n in ("gate_proj", "up_proj")})
        plan.update({f"model.layers.{i}.self_attn.o_proj": RowwiseParallel(),
                     f"model.layers.{i}.mlp.down_proj": RowwiseParallel()})
    parallelize_module(m, mesh, plan)
    return m


def _train_llama(m, closure, steps=2, **kw):
    opt = MeZO(m.named_parameters(), model=m, **HYPER, **kw)
    with torch.no_grad():
        for _ in range(steps):
            opt.step(closure)
    return opt


def _worker_llama(rank, world, out):
    res = {}
    m = _llama_sharded("fsdp", world)
    res["fsdp first loss"] = _llama_loss(m)
    opt = _train_llama(m, lambda: _llama_loss(m))       # the same batch on every rank
    res["fsdp"] = full_state(m), opt.log, _llama_loss(m)
    for name, dtype, kw in (MODES[0], MODES[1]):
        m = _llama_sharded("tp", world, dtype)
        opt = _train_llama(m, fixed_losses(), **kw)
        res["tp", name] = full_state(m), opt.log, opt.loss_group is None
    m = _llama_sharded("tp", world)
    res["tp loss"] = _llama_loss(m)
    if rank == 0:
        torch.save(res, out)


@pytest.fixture(scope="module")
def got_llama(tmp_path_factory):
    return spawn_results(tmp_path_factory, "dtensor_llama", _worker_llama, 2)


def test_tiny_llama_fsdp2_same_batch_is_bit_exact(got_llama):
    m = _llama()
    assert got_llama["fsdp first loss"] == _llama_loss(m)
    opt = _train_llama(m, lambda: _llama_loss(m))
    state, log, loss = got_llama["fsdp"]
    assert log == opt.log and equal_states(state, full_state(m)) == []
    assert loss == _llama_loss(m)


def test_tiny_llama_tp_same_g_is_bit_exact(got_llama):
    assert _llama().config.num_attention_heads % 2 == 0 and _llama().config.num_key_value_heads % 2 == 0
    assert got_llama["tp loss"] == pytest.approx(_llama_loss(_llama()), rel=1e-6)
    for name, dtype, kw in (MODES[0], MODES[1]):
        m = _llama(dtype)
        opt = _train_llama(m, fixed_losses(), **kw)
        state, log, no_group = got_llama["tp", name]
        assert log == opt.log and equal_states(state, full_state(m)) == [], name
        assert no_group
