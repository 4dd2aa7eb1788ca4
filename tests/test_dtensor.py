"""MeZO over DTensor parameters on 2 gloo processes: FSDP2 (``fully_shard``, uneven ``Shard(0)``) and tensor
parallelism (``Shard(0)``/``Shard(1)``) draw the single-process z bit for bit, train to the single-process weights
bit for bit for the same g in every mode, replay on any world size, average the loss over the data-parallel ranks,
and refuse what they cannot serve with errors naming the tensor or rank. One spawn runs every check (the
imports dominate); the single-process references are computed here."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from dtensor_cases import (HYPER, MODES, X, equal_states, fixed_losses, full_state, loss_of, perturbed_full, shard,
                           spawn_results, stack, train_fixed)
from mezo_kernels.optim import MeZO, replay
from mezo_kernels.perturb import ParamSet

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _virtual_closure(m, seen):
    """Fixed losses after a forward that records the full weight each Linear's forward saw (a collective; a
    forward hook, so it runs before the virtual perturbation's own, which puts theta back)."""
    losses = fixed_losses()

    def hook(mod, args, output):
        seen.append(mod.weight.full_tensor().clone())
    handles = [m[i].register_forward_hook(hook) for i in (0, 2)]

    def closure():
        m(X.to(torch.bfloat16))
        return losses()
    return closure, handles


def _errors(rank, world):
    """Each bad input's message (every rank raises, so none hangs)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial
    out = {}

    def catch(key, fn):
        try:
            fn()
        except (ValueError, TypeError) as e:
            out[key] = str(e)

    plain = lambda n=3: [torch.zeros(n, requires_grad=True)]  # noqa: E731
    catch("seed", lambda: MeZO(plain(), lr=0.1, seed=7 + rank))
    catch("config", lambda: MeZO(plain(), lr=0.1, eps=1e-3 * (1 + rank)))
    catch("shapes", lambda: MeZO(plain(3 + rank), lr=0.1))
    catch("group", lambda: MeZO(plain(), lr=0.1, loss_group=True))
    a, b = (init_device_mesh("cpu", (world,), mesh_dim_names=(n,)) for n in ("a", "b"))
    two = nn.ParameterList([nn.Parameter(DTensor.from_local(torch.zeros(2), m)) for m in (a, b)])
    catch("meshes", lambda: MeZO(two.named_parameters(), lr=0.1, model=two))
    part = nn.ParameterList([nn.Parameter(DTensor.from_local(torch.zeros(2), a, [Partial()]))])
    catch("partial", lambda: MeZO(part.named_parameters(), lr=0.1, model=part))
    catch("no model", lambda: MeZO(two.parameters(), lr=0.1))
    catch("paramset", lambda: ParamSet([two[0]]))
    m = shard(stack(), "fsdp", world)
    catch("virtual fsdp", lambda: MeZO(m.parameters(), lr=0.1, model=m, perturb="virtual"))
    loss_of(m)                                     # the root stays unsharded: its parameters read as plain
    unsharded = list(m.named_parameters())
    catch("unsharded", lambda: MeZO(unsharded, lr=0.1, model=m))
    return out


def _worker(rank, world, out):
    res = {}
    for kind in ("fsdp", "tp"):
        for dist_name in ("gaussian", "rademacher"):
            m = shard(stack(), kind, world)
            res[kind, "z", dist_name] = perturbed_full(m, MeZO(m.named_parameters(), model=m, **HYPER,
                                                                 distribution=dist_name), 123)
        for name, dtype, kw in MODES:
            m = shard(stack(dtype), kind, world)
            opt = train_fixed(m, **kw)
            res[kind, name] = full_state(m), opt.log
            res[kind, "group", name] = None if opt.loss_group is None else dist.get_process_group_ranks(
                opt.loss_group)
        m = shard(stack(), kind, world)                 # replay of the fp32 run on fresh shards
        replay(m.named_parameters(), res[kind, "fp32"][1], model=m)
        res[kind, "replay"] = full_state(m)
    # resume from state_dict (fp32 masters of the local shards) on a copy of the shards: the same bits on
    m = shard(stack(torch.bfloat16), "fsdp", world)
    opt = train_fixed(m, steps=2)
    m2 = shard(stack(torch.bfloat16), "fsdp", world)
    with torch.no_grad():
        for p, q in zip(m.parameters(), m2.parameters()):
            q.to_local().copy_(p.to_local())
    opt2 = MeZO(m2.named_parameters(), model=m2, **HYPER)
    sd = opt.state_dict()
    opt2.load_state_dict(sd)
    for o in (opt, opt2):
        closure = fixed_losses()
        with torch.no_grad():
            for _ in range(2):
                o.step(closure)
    res["resume"] = full_state(m), full_state(m2), [None if t is None else tuple(t.shape) for t in sd["masters"]]
    # a parameter whose only row lives on rank 0: rank 1 holds nothing of it (no kernel entry, no set)
    torch.manual_seed(1)
    m = shard(nn.Sequential(nn.Linear(3, 1)), "fsdp-root", world)
    opt = train_fixed(m)
    counts = [None] * world
    dist.all_gather_object(counts, len(opt.param_sets))
    res["empty"] = full_state(m), counts
    # virtual perturbation under TP: the Linears' forwards see the perturbed shards
    m = shard(stack(torch.bfloat16), "tp", world)
    opt = MeZO(m.named_parameters(), model=m, perturb="virtual", **HYPER)
    seen = []
    closure, handles = _virtual_closure(m, seen)
    with torch.no_grad():
        for _ in range(3):
            opt.step(closure)
    for h in handles:
        h.remove()
    res["tp", "virtual"] = full_state(m), opt.log, seen
    # FSDP2, the model's own loss: the same batch everywhere (bit for bit), then one half per rank (real DP)
    for key, rows in (("same", slice(None)), ("dp", slice(4 * rank, 4 * rank + 4))):
        m = shard(stack(), "fsdp", world)
        opt = MeZO(m.named_parameters(), model=m, **HYPER)
        with torch.no_grad():
            for _ in range(3):
                opt.step(lambda: loss_of(m, rows))
        res["fsdp", key] = full_state(m), opt.log, loss_of(m)
    # plain replicated tensors, different losses per rank and a NaN on rank 1 only: all ranks skip it together
    p = [torch.nn.Parameter(torch.linspace(-1, 1, 7))]
    opt = MeZO(p, **HYPER)
    calls = iter(range(100))
    with torch.no_grad():
        for _ in range(3):
            opt.step(lambda: float("nan") if rank == 1 and next(calls) == 2 else 1.0 + rank + 0.1 * p[0].sum())
    gathered = [None] * world
    dist.all_gather_object(gathered, (p[0].detach().clone(), opt.log))
    res["plain"] = gathered
    res["errors"] = _errors(rank, world)
    if rank == 0:
        torch.save(res, out)


@pytest.fixture(scope="module")
def got(tmp_path_factory):
    return spawn_results(tmp_path_factory, "dtensor", _worker, 2)


def _single(dtype=torch.float32, **kw):
    m = stack(dtype)
    return m, train_fixed(m, **kw)


@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_sharded_z_is_the_single_process_z(got, kind):
    for dist_name in ("gaussian", "rademacher"):
        m = stack()
        ref = dict(m.named_parameters())
        ParamSet(list(ref.items()), distribution=dist_name).perturb_(123, 0.5)
        assert equal_states(got[kind, "z", dist_name], {k: v.detach() for k, v in ref.items()}) == [], dist_name


@pytest.mark.parametrize("kind", ["fsdp", "tp"])
@pytest.mark.parametrize("mode", [name for name, *_ in MODES])
def test_same_g_gives_the_single_process_weights_bit_for_bit(got, kind, mode):
    _, dtype, kw = next(c for c in MODES if c[0] == mode)
    m, opt = _single(dtype, **kw)
    state, log = got[kind, mode]
    assert log == opt.log and log.config == opt.log.config
    assert equal_states(state, full_state(m)) == []
    # FSDP2's loss group is its mesh (both ranks); a pure TP mesh has none: each rank's loss already is the loss
    assert got[kind, "group", mode] == ([0, 1] if kind == "fsdp" else None)


@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_replay_lands_on_the_logged_bits_on_shards_and_on_one_process(got, kind):
    state, log = got[kind, "fp32"]
    assert equal_states(got[kind, "replay"], state) == []
    m = stack()
    replay(m.named_parameters(), log)               # the sharded run's log, plain full tensors, one process
    assert equal_states(full_state(m), state) == []


def test_state_dict_holds_the_local_masters_and_resumes_bit_for_bit(got):
    a, b, shapes = got["resume"]
    assert equal_states(a, b) == []
    assert shapes == [(5, 6), (5,), (3, 10), (3,), (3,), (3,)]        # rank 0's local shards, fp32 masters


def test_a_rank_that_holds_nothing_of_a_tensor_steps_along(got):
    state, n_sets = got["empty"]
    assert n_sets == [1, 0]                                          # rank 1 holds no row: no set
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(3, 1))
    train_fixed(m)
    assert equal_states(state, full_state(m)) == []


def test_virtual_perturbation_under_tp_sees_the_perturbed_shards(got):
    state, log, seen = got["tp", "virtual"]
    m = stack(torch.bfloat16)
    opt = MeZO(m.named_parameters(), model=m, perturb="virtual", **HYPER)
    ref_seen = []
    losses = fixed_losses()
    hook = lambda mod, args, output: ref_seen.append(mod.weight.detach().clone())  # noqa: E731
    for i in (0, 2):
        m[i].register_forward_hook(hook)
    with torch.no_grad():
        for _ in range(3):
            opt.step(lambda: (m(X.to(torch.bfloat16)), losses())[1])
    assert log == opt.log and equal_states(state, full_state(m)) == []
    assert len(seen) == len(ref_seen) == 12 and all(torch.equal(a, b) for a, b in zip(seen, ref_seen))
    assert not torch.equal(seen[0], seen[2])         # the + and - passes saw different weights


def test_fsdp_same_batch_is_bit_exact_and_real_dp_matches_the_mean(got):
    state, log, loss = got["fsdp", "same"]
    m = stack()
    opt = MeZO(m.named_parameters(), **HYPER)
    with torch.no_grad():
        for _ in range(3):
            opt.step(lambda: loss_of(m))
    assert log == opt.log and equal_states(state, full_state(m)) == []
    assert loss == loss_of(m)           # the root module's forward gathered the written shards, not a stale copy
    state, log, _ = got["fsdp", "dp"]
    m = stack()
    opt = MeZO(m.named_parameters(), **HYPER)
    with torch.no_grad():
        for _ in range(3):
            opt.step(lambda: (loss_of(m, slice(0, 4)) + loss_of(m, slice(4, 8))) / 2)
    assert [r["g"] for r in log] == pytest.approx([r["g"] for r in opt.log], rel=1e-5)
    assert all(torch.allclose(state[k], v, rtol=0, atol=1e-6) for k, v in full_state(m).items())


def test_a_non_finite_mean_loss_skips_the_direction_on_every_rank(got):
    (w0, log0), (w1, log1) = got["plain"]
    assert log0 == log1 and torch.equal(w0, w1)           # the replicas got one g and stayed identical
    assert [r.get("skip") for r in log0] == [None, "minus", None]
    p = [torch.nn.Parameter(torch.linspace(-1, 1, 7))]
    replay(p, log0)
    assert torch.equal(p[0].detach(), w0)


def test_bad_input_is_refused_with_a_clear_error(got):
    e = got["errors"]
    assert "rank(s) [1]" in e["seed"] and "rank 0: 7, rank 1: 8" in e["seed"]
    assert "rank(s) [1]" in e["config"] and "eps" in e["config"]
    assert "rank(s) [1]" in e["shapes"] and "parameter shapes" in e["shapes"]
    assert "loss_group must be" in e["group"]
    assert "1 lives on mesh" in e["meshes"] and "another device mesh" in e["meshes"]
    assert e["partial"].startswith("0: a Partial placement") and "summand" in e["partial"]
    assert "needs model=" in e["no model"]
    assert "DTensor" in e["paramset"]
    assert "cannot serve FSDP2" in e["virtual fsdp"]
    assert "unsharded" in e["unsharded"] and "reshard" in e["unsharded"]
