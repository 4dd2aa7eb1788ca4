"""MeZO with low-rank directions (issue 21): the in-place reference path against the spec, the forward-side rank-r
term against the materialised perturbation (float64 references), tied weights, lr = 0 in bf16, replay, lazy V, the
seed-log header and the errors."""
import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mezo_kernels.optim import MeZO, replay
from mezo_kernels.perturb import ParamSet
from mezo_kernels.perturb.lowrank import lowrank_update_reference
from mezo_kernels.rng.lowrank import lowrank_direction, lowrank_factors
from mezo_kernels.virtual import VirtualPerturbation

R = 2


def tiny(dtype=torch.float32, tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype).eval()


IDS = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))


def lm_loss(m):
    with torch.no_grad():
        return m(input_ids=IDS, labels=IDS).loss.float().item()


def bits(t):
    return t.detach().contiguous().view(-1).view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_inplace_update_is_the_spec_on_lowrank_tensors_and_dense_elsewhere(backend):
    torch.manual_seed(3)
    ts = [torch.randn(33, 17), torch.randn(5), torch.randn(4, 3), torch.randn(9, 70)]
    ref = [t.clone() for t in ts]
    ps = ParamSet(ts, lowrank_r=R, backend=backend)
    assert sorted(e.index for e in ps.lowrank.entries) == [0, 3]      # 1-d and r(m+n) >= mn stay dense
    ps.update_(9, 0.1, 2.0)
    for i in (0, 3):
        u, v = lowrank_factors(9, 9, ps.bases[i], *ts[i].shape, R)
        want = lowrank_update_reference(ref[i], u, v, 1.0, -0.2)
        if backend == "torch":
            assert torch.equal(ts[i], want)
        else:       # the C++ Gaussian stream is within the spec's 1e-6 of the torch one
            torch.testing.assert_close(ts[i], want, rtol=0, atol=2e-6)
    dense = ParamSet([ref[1].clone(), ref[2].clone()], bases=[ps.bases[1], ps.bases[2]], backend=backend)
    dense.update_(9, 0.1, 2.0)
    assert torch.equal(ts[1], dense.tensors[0]) and torch.equal(ts[2], dense.tensors[1])


def test_bf16_masters_restore_exactly_and_copies_match_the_view():
    torch.manual_seed(4)
    w = torch.randn(40, 30).bfloat16()
    before = w.clone()
    ps = ParamSet([w], lowrank_r=R, backend="torch")
    copy = ps.perturbed_copy(5, 0.25, 0)
    ps.perturb_(5, 0.25)
    assert torch.equal(bits(w), bits(copy))
    z = lowrank_direction(5, 5, ps.bases[0], w.shape, R).double()
    assert (w.double() - (before.double() + 0.25 * z)).abs().max() < 0.03      # bf16 rounding of ~2-4
    ps.perturb_(5, -0.25)
    ps.restore_()
    assert torch.equal(bits(w), bits(before))


def _module_cases():
    torch.manual_seed(6)
    from transformers.pytorch_utils import Conv1D
    conv = Conv1D(19, 13)
    with torch.no_grad():
        conv.bias.normal_()
    emb = nn.Embedding(50, 12, padding_idx=0)
    return [("linear", nn.Linear(13, 19), torch.randn(2, 5, 13)),
            ("conv1d", conv, torch.randn(2, 5, 13)),
            ("embedding", emb, torch.randint(0, 50, (2, 7)))]


@pytest.mark.parametrize("grad", [False, True])        # in place into the output / out of place under autograd
@pytest.mark.parametrize("case", ["linear", "conv1d", "embedding"])
def test_forward_term_equals_the_materialised_perturbation(case, grad):
    name, mod, x = next(c for c in _module_cases() if c[0] == case)
    params = list(mod.named_parameters())
    ps = ParamSet(params, lowrank_r=R, backend="torch")
    assert ps.lowrank.covers(0)
    vp = VirtualPerturbation(mod, [ps])
    w = mod.weight
    ptr, ver = w.data_ptr(), w._version
    seen = []
    mod.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
    with torch.set_grad_enabled(grad), vp.perturbed(7, 0.5):
        got = mod(x)
    assert got.requires_grad == grad
    assert seen == [ptr] and w._version == ver           # the weight was neither swapped nor written
    # float64 reference: the module at theta + 0.5*z, z from the spec (bias dense)
    z = [lowrank_direction(7, 7, b, t.shape, R).double() for (_, t), b in zip(params, ps.bases)]
    pert = {n: t.detach().double() + 0.5 * zz for (n, t), zz in zip(params, z)}
    if name == "linear":
        want = x.double() @ pert["weight"].T + pert["bias"]
    elif name == "conv1d":
        want = x.double() @ pert["weight"] + pert["bias"]
    else:
        want = pert["weight"][x]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-6)
    assert vp.unreached == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tie", [True, False])
def test_forward_term_losses_match_the_inplace_reference_and_replay_is_bit_exact(dtype, tie):
    runs = {}
    for perturb in ("virtual", "inplace"):
        m = tiny(dtype, tie)
        opt = MeZO(m.named_parameters(), lr=1e-3, eps=1e-2, distribution="lowrank", lowrank_r=R, model=m,
                   perturb=perturb, seed=5, weight_decay=0.01)
        losses = []
        for _ in range(3):
            res = opt.step(lambda: lm_loss(m))
            losses += [res.loss_plus, res.loss_minus]
        runs[perturb] = losses
        fresh = tiny(dtype, tie)
        replay(fresh.named_parameters(), opt.log, model=fresh)
        assert [n for (n, a), b in zip(m.named_parameters(), fresh.parameters()) if not torch.equal(bits(a), bits(b))
                ] == [], perturb
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    # the first step starts from the same weights, so its losses agree to the forward's rounding
    torch.testing.assert_close(torch.tensor(runs["virtual"][:2]), torch.tensor(runs["inplace"][:2]), rtol=tol, atol=0)
    assert runs["virtual"][0] != runs["virtual"][1]


def test_tied_weight_gets_one_perturbation_seen_by_both_uses():
    m = tiny(tie=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    opt = MeZO(m.named_parameters(), lr=0.0, eps=1e-2, distribution="lowrank", lowrank_r=R, model=m, seed=3)
    names = [n for ps in opt.param_sets for n in ps.names]
    assert sum("embed_tokens" in n or "lm_head" in n for n in names) == 1
    with torch.no_grad(), opt.virtual.perturbed(opt.seed_for(0), 1e-2):
        virt = lm_loss(m)
    ps = opt.param_sets[0]
    ps.perturb_(opt.seed_for(0), 1e-2)
    inpl = lm_loss(m)
    ps.restore_()
    assert math.isclose(virt, inpl, rel_tol=1e-5)
    # the LM head alone perturbed would give another loss: both uses see the term
    assert opt.virtual.unreached == []


def test_bf16_lr0_steps_leave_weights_bit_identical():
    m = tiny(torch.bfloat16)
    before = [bits(p).clone() for p in m.parameters()]
    opt = MeZO(m.named_parameters(), lr=0.0, eps=1e-2, distribution="lowrank", lowrank_r=4, model=m, seed=1)
    for _ in range(3):
        opt.step(lambda: lm_loss(m))
    assert all(torch.equal(a, bits(p)) for a, p in zip(before, m.parameters()))
    assert opt.param_sets[0].masters() == [None] * len(opt.param_sets[0].tensors)   # no fp32 masters


def _deltas(lazy, steps=4):
    lin = nn.Linear(30, 20, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    opt = MeZO(lin.named_parameters(), lr=1.0, eps=1e-2, distribution="lowrank", lowrank_r=1, model=lin,
               perturb="inplace", lowrank_lazy=lazy, seed=2)
    vals = iter([1.0, 0.0] * steps)
    out, prev = [], lin.weight.detach().clone()
    for _ in range(steps):
        opt.step(lambda: next(vals))
        out.append(lin.weight.detach() - prev)
        prev = lin.weight.detach().clone()
    return out, opt


def test_lazy_v_keeps_v_for_the_window_and_redraws_u():
    def row_space_rank(ds):
        s = torch.linalg.svdvals(torch.cat(ds).double())
        return int((s > 1e-6 * s[0]).sum())
    lazy, opt = _deltas(3)
    assert row_space_rank(lazy[:3]) == 1            # one V (the rows of every delta) for steps 0-2
    assert row_space_rank(lazy[2:4]) == 2           # step 3 opens a new window
    assert row_space_rank([d.T for d in lazy[:3]]) == 3      # U redrawn every step
    plain, _ = _deltas(1)
    assert row_space_rank(plain[:3]) == 3
    assert opt.config()["lowrank_lazy"] == 3 and opt.log.config["lowrank_lazy"] == 3


def test_lazy_replay_and_header(tmp_path):
    m = tiny()
    opt = MeZO(m.named_parameters(), lr=1e-3, eps=1e-2, distribution="lowrank", lowrank_r=R, model=m, seed=5,
               lowrank_lazy=2)
    for _ in range(3):
        opt.step(lambda: lm_loss(m))
    fresh = tiny()
    replay(fresh.named_parameters(), opt.log, model=fresh)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), fresh.parameters()))
    other = tiny()
    with pytest.raises(ValueError, match="lowrank_lazy"):
        MeZO(other.named_parameters(), lr=1e-3, eps=1e-2, distribution="lowrank", lowrank_r=R, model=other,
             seed=5).replay_(opt.log)
    with pytest.raises(ValueError, match="lowrank_r"):
        MeZO(other.named_parameters(), lr=1e-3, eps=1e-2, distribution="lowrank", lowrank_r=R + 1, model=other,
             seed=5, lowrank_lazy=2).replay_(opt.log)


class _Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.mat = nn.Parameter(torch.randn(12, 9))

    def forward(self, x):
        return x @ self.mat


@pytest.mark.parametrize("kw, match", [
    (dict(lowrank_r=0), "lowrank_r must be >= 1"),
    (dict(lowrank_r=1.5), "lowrank_r must be an int"),
    (dict(distribution="gaussian", lowrank_r=2), "lowrank_r is an option of distribution='lowrank'"),
    (dict(distribution="gaussian", lowrank_lazy=2), "lowrank_lazy is an option"),
    (dict(lowrank_lazy=0), "lowrank_lazy must be an int >= 1"),
    (dict(lowrank_lazy=3, n_directions=2), "would reuse it"),
    (dict(model=None), "needs model="),
])
def test_bad_input_is_named(kw, match):
    lin = nn.Linear(10, 8)
    args = dict(lr=0.1, distribution="lowrank", model=lin)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        MeZO(lin.parameters(), **args)


def test_a_module_kind_without_a_forward_term_is_named():
    m = _Bilinear()
    with pytest.raises(ValueError, match=r"_Bilinear\.mat .*perturb='inplace'"):
        MeZO(m.named_parameters(), lr=0.1, distribution="lowrank", model=m)
    MeZO(m.named_parameters(), lr=0.1, distribution="lowrank", model=m, perturb="inplace")   # materialises z


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_the_forward_draws_the_factors_the_update_applies(backend):
    from mezo_kernels.rng.lowrank import lowrank_product
    w = torch.zeros(37, 29)
    ps = ParamSet([torch.zeros(3), w], lowrank_r=3, backend=backend)
    u, v = ps.lowrank.factors((11, 12), 1)
    ps.update_((11, 12), 1.0, -1.0)                   # w = 0 + 1*z
    assert torch.equal(w, lowrank_product(u, v))


@pytest.mark.parametrize("seed", [21, (21, 22)])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_factors_of_the_whole_set_in_one_launch_equal_each_tensors(backend, seed):
    ts = [torch.zeros(37, 29), torch.zeros(5), torch.zeros(64, 9), torch.zeros(3, 100)]
    ps = ParamSet(ts, lowrank_r=2, backend=backend)
    got = ps.lowrank.factors_all(seed)
    assert sorted(got) == [0, 2, 3]
    for i, (u, v) in got.items():
        eu, ev = ps.lowrank.factors(seed, i)
        assert torch.equal(u, eu) and torch.equal(v, ev)


def test_an_embedding_subclass_with_its_own_forward_is_materialised_with_the_same_z():
    # OPT's learned positions take the attention mask, not the ids: the term cannot be gathered, the copy can
    from mezo_kernels import models
    m, _, _ = models.load_model("tiny-opt", seed=2)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(True)
    ids = torch.randint(4, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    opt = MeZO(m.named_parameters(), lr=1e-3, eps=1e-2, distribution="lowrank", lowrank_r=R, model=m, seed=8)
    ps = opt.param_sets[0]
    pos = next(i for i, n in enumerate(ps.names) if "embed_positions" in n)
    assert ps.lowrank.covers(pos)
    loss = lambda: m(input_ids=ids, labels=ids).loss.float().item()  # noqa: E731
    with torch.no_grad(), opt.virtual.perturbed(opt.seed_for(0), 1e-2):
        virt = loss()
    with torch.no_grad():
        ps.perturb_(opt.seed_for(0), 1e-2)
        inpl = loss()
        ps.restore_()
    assert math.isclose(virt, inpl, rel_tol=1e-5) and opt.virtual.unreached == []
