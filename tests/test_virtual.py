"""Virtual perturbation: weights never written by the passes, losses equal those at round(theta +- eps*z), tied
weights perturbed once, transient memory, caches never stale, replay/resume bit-exact, failures leave no trace."""
import contextlib
import copy
import weakref

import pytest
import torch
from torch import nn

from mezo_kernels import models
from mezo_kernels.virtual import state as weight_state
from mezo_kernels._compat import param_version
from mezo_kernels.forward.engine import ForwardEngine
from mezo_kernels.optim import MeZO, replay
from mezo_kernels.perturb import ParamSet
from mezo_kernels.virtual import VirtualPerturbation

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Tiny(nn.Module):
    """Embedding -> norm-like scale -> Linear -> tied head: every kind of owner, one tied tensor."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(11, 6)
        self.scale = nn.Parameter(torch.ones(6))
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight                       # tied
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.to(dtype)

    def forward(self, ids):
        h = self.emb(ids) * self.scale
        return self.head(torch.tanh(self.lin(h)))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: thread start-up would dominate (and the 1,000-step test would crawl on a loaded box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def _loss(model):
    return lambda: float(nn.functional.cross_entropy(model(IDS).detach().float().flatten(0, 1), IDS.flatten()))


def _snap(model):
    return [(p.detach().clone(), param_version([p])) for p in model.parameters()]


def _same(model, snap):
    return all(torch.equal(p, s) and param_version([p]) == v for p, (s, v) in zip(model.parameters(), snap))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lr0_steps_leave_weights_bit_identical_and_unwritten(dtype):
    model = Tiny(dtype)
    snap, f = _snap(model), _loss(model)
    opt = MeZO(list(model.named_parameters()), lr=0.0, eps=1e-2, model=model, perturb="virtual")
    assert opt.param_sets[0].exact_restore is False          # no fp32 masters needed
    moved = 0
    with torch.no_grad():
        for _ in range(1000):
            r = opt.step(f)
            moved += r.loss_plus != r.loss_minus              # the passes did see perturbed weights
    assert _same(model, snap)                                # bits and version counters
    assert moved > 900


def _reference_loss(model, dtype, seed, offset, dist):
    """The loss of a copy whose weights were set to round(theta + offset*z) by the in-place kernels."""
    ref = copy.deepcopy(model)
    ParamSet([p for p in ref.parameters()], exact_restore=False, distribution=dist).perturb_(seed, offset)
    return _loss(ref)()


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_virtual_losses_equal_the_losses_at_perturbed_weights(dtype, dist):
    model = Tiny(dtype, seed=3)
    opt = MeZO(list(model.parameters()), lr=0.0, eps=0.05, model=model, perturb="virtual", distribution=dist)
    with torch.no_grad():
        r = opt.step(_loss(model))
        plus = _reference_loss(model, dtype, r.seed, +0.05, dist)
        minus = _reference_loss(model, dtype, r.seed, -0.05, dist)
    assert (r.loss_plus, r.loss_minus) == (plus, minus)
    assert plus != minus


def test_tied_weight_sees_one_perturbation():
    model = Tiny(torch.float32)
    seen = {}
    model.emb.register_forward_hook(lambda m, a, o: seen.setdefault("emb", o))          # gathers its rows
    model.head.register_forward_hook(lambda m, a, o: seen.setdefault("head", m.weight.detach().clone()))
    ps = ParamSet(list(model.parameters()), exact_restore=False)
    vp = VirtualPerturbation(model, [ps])
    with torch.no_grad(), vp.perturbed(9, 0.1):
        model(IDS)
    tied = next(i for i, t in enumerate(ps.tensors) if t is model.emb.weight)
    expect = ps.perturbed_copy(9, 0.1, tied)
    assert torch.equal(seen["emb"], nn.functional.embedding(IDS, expect)) and torch.equal(seen["head"], expect)
    assert not torch.equal(expect, model.emb.weight)
    assert model.head.weight is model.emb.weight and isinstance(model.emb.weight, nn.Parameter)


def test_transient_buffers_are_freed_after_each_forward_and_peak_is_the_largest_tensor():
    model = Tiny(torch.float32)
    alive, refs = [], []

    def watch(m, a, o):           # runs inside the module's call, before the buffer is dropped
        refs.append(weakref.ref(m.weight))
        alive.append(vp.live_bytes)
    for m in (model.lin, model.head):
        m.register_forward_hook(watch)
    vp = VirtualPerturbation(model, [ParamSet(list(model.parameters()), exact_restore=False)])
    with torch.no_grad(), vp.perturbed(1, 0.1):
        model(IDS)
    # the root owns ``scale`` and its forward encloses the others: its buffer is live throughout (a nested owner);
    # the embedding gathers the 8 distinct rows IDS reads, the head materialises the whole [11, 6] table
    scale, rows, lin, head = 6 * 4, 8 * 6 * 4, (6 * 6 + 6) * 4, 11 * 6 * 4
    assert alive == [scale + lin, scale + head] and vp.live_bytes == 0
    assert vp.peak_bytes == scale + max(rows, lin, head)
    assert all(r() is None for r in refs)                   # every buffer was freed


def test_requires_model_and_ownership():
    model = Tiny()
    with pytest.raises(ValueError, match="needs model="):
        MeZO(list(model.parameters()), lr=0.1, perturb="virtual")
    stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not parameters of any module"):
        MeZO([*model.parameters(), stray], lr=0.1, perturb="virtual", model=model)
    with pytest.raises(ValueError, match="perturb must be one of"):
        MeZO(list(model.parameters()), lr=0.1, perturb="virt", model=model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        VirtualPerturbation("model", [ParamSet(list(model.parameters()))])


class Boom(Exception):
    pass


def test_exception_inside_forward_leaves_weights_hooks_and_registry_clean():
    model = Tiny(torch.bfloat16)
    snap = _snap(model)
    originals = [model.emb.weight, model.lin.weight, model.scale]
    opt = MeZO(list(model.parameters()), lr=0.1, eps=1e-2, model=model, perturb="virtual")

    def bad():
        model.lin.register_forward_hook(lambda *a: (_ for _ in ()).throw(Boom()))   # fails inside lin's call
        return _loss(model)()
    with torch.no_grad(), pytest.raises(Boom):
        opt.step(bad)
    assert _same(model, snap) and not weight_state.active()
    assert [model.emb.weight, model.lin.weight, model.scale] == originals      # the Parameters themselves
    copies = opt.virtual.copies
    model.lin._forward_hooks.clear()
    model(IDS)                                               # no hook of ours left: nothing is materialised
    assert opt.virtual.copies == copies and opt.virtual.live_bytes == 0


@pytest.mark.parametrize("where", ["plus", "minus"])
def test_nan_loss_skips_the_direction_without_writing(where):
    model = Tiny(torch.float16)
    snap, f, calls = _snap(model), _loss(model), []

    def closure():
        calls.append(1)
        return float("nan") if (len(calls) == 1) == (where == "plus") else f()
    opt = MeZO(list(model.parameters()), lr=0.1, eps=1e-2, model=model, perturb="virtual")
    with torch.no_grad():
        r = opt.step(closure)
    assert r.skipped and _same(model, snap) and opt.log[0]["skip"] == where


def _train(model, steps, opt=None, **kw):
    opt = opt or MeZO(list(model.parameters()), lr=0.05, eps=1e-2, seed=4, model=model, **{"perturb": "virtual", **kw})
    with torch.no_grad():
        for _ in range(steps):
            opt.step(_loss(model))
    return opt


@pytest.mark.parametrize("dtype", DTYPES)
def test_replay_and_resume_are_bit_exact_with_signs(dtype):
    kw = dict(perturb="virtual", distribution="rademacher")
    a = Tiny(dtype)
    opt = _train(a, 6, **kw)
    assert opt.config()["distribution"] == "rademacher" and opt.config()["perturb"] == "virtual"
    b = Tiny(dtype)
    assert not torch.equal(a.lin.weight, b.lin.weight)
    replay(list(b.parameters()), opt.state_dict())           # no model needed to replay
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = Tiny(dtype)                                          # resume: replay 3 steps, then train 3 more
    first = _train(Tiny(dtype), 3, **kw).state_dict()
    opt_c = replay(list(c.parameters()), first, model=c)
    _train(c, 3, opt=opt_c)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert opt_c.log == opt.log


def test_replay_refuses_another_distribution_or_mode():
    a = Tiny(torch.bfloat16)
    sd = _train(a, 2, perturb="virtual", distribution="rademacher").state_dict()
    b = Tiny(torch.bfloat16)
    with pytest.raises(ValueError, match="distribution='rademacher'"):
        replay(list(b.parameters()), sd, config={**sd["config"], "distribution": "gaussian"})
    gauss = MeZO(list(b.parameters()), lr=0.05, eps=1e-2, seed=4, model=b, perturb="virtual")
    with pytest.raises(ValueError, match="distribution"):
        gauss.replay_(sd)
    with pytest.raises(ValueError, match="distribution"):
        gauss.load_state_dict(sd)
    inplace = MeZO(list(b.parameters()), lr=0.05, eps=1e-2, seed=4, perturb="inplace", distribution="rademacher")
    with pytest.raises(ValueError, match="perturb='virtual'"):
        inplace.replay_(sd)
    stepless = replay(list(b.parameters()), sd)
    with pytest.raises(ValueError, match="without model="):
        stepless.step(_loss(b))


def test_update_is_stochastically_rounded_and_matches_the_kernel():
    a, ref = Tiny(torch.bfloat16), Tiny(torch.bfloat16)
    opt = _train(a, 1)
    rec = opt.log[0]
    ParamSet(list(ref.parameters()), exact_restore=False).update_(rec["seed"], rec["lr"], rec["g"],
                                                                  rounding="stochastic")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), ref.parameters()))
    near = Tiny(torch.bfloat16)
    ParamSet(list(near.parameters()), exact_restore=False).update_(rec["seed"], rec["lr"], rec["g"])
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), near.parameters()))


# ------------------------------------------------------------------------------------------- the forward engine
def _lora_llama(first_layer):
    from test_forward_cache import _model
    return _model(first_layer=first_layer)


@pytest.mark.parametrize("first_layer", [0, 1], ids=["eval-cache", "frozen-cache"])
def test_engine_never_reuses_across_virtual_passes(first_layer):
    """+eps, -eps and unperturbed in every order: each forward of the reusing engine equals the plain forward
    under the same state (a stale entry would carry another state's values, far outside the tolerance), while
    a repeated state still hits the eval cache and the frozen-layer state is shared by all of them."""
    from test_forward import ATOL_F32
    from test_forward_cache import _call, _plain, _rows
    model = _lora_llama(first_layer)
    rows = _rows(3)
    params = [p for _, p in models.trainable_parameters(model)]
    versions = param_version(params)
    vp = VirtualPerturbation(model, [ParamSet(params, exact_restore=False)])
    eng = ForwardEngine()
    states = [None, None, (5, 0.5), (5, -0.5), None, (5, -0.5), (5, 0.5), (6, 0.5), (5, 0.5)]
    outs = {}
    for st in states:
        ctx = vp.perturbed(*st) if st else contextlib.nullcontext()
        with ctx:
            got, want = _call(eng, model, rows), _plain(model, rows)
        torch.testing.assert_close(got, want, atol=ATOL_F32, rtol=1e-5)
        outs.setdefault(st, want)
    vals = list(outs.values())
    assert all(not torch.allclose(a, b, atol=1e-3) for i, a in enumerate(vals) for b in vals[i + 1:])
    if first_layer == 0:
        assert eng.stats.prefix_cache_hits >= 1              # the repeated unperturbed state: a legitimate hit
    else:
        assert eng.stats.frozen_misses == 1 and eng.stats.frozen_hits == len(states) - 1
    assert param_version(params) == versions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_parameter_llama_through_the_engine_equals_perturbed_weights(dtype):
    model, _, _ = models.load_model("tiny-llama", seed=2, dtype=dtype)
    assert model.lm_head.weight is model.model.embed_tokens.weight     # tied: one tensor, one z
    from test_forward_cache import _batch, _requests, _rows
    rows = _rows(4)
    ids, mask = _batch(rows)
    req = _requests(rows, mask)

    def loss_of(m, eng):
        return lambda: float(eng.logits_at(m, ids, mask, *req).float().logsumexp(-1).mean())
    params = list(model.named_parameters())
    snap = _snap(model)
    opt = MeZO(params, lr=0.0, eps=1e-2, model=model, perturb="virtual")
    with torch.no_grad():
        r = opt.step(loss_of(model, ForwardEngine()))
    assert _same(model, snap)
    for off, got in ((1e-2, r.loss_plus), (-1e-2, r.loss_minus)):
        ref = copy.deepcopy(model)
        ParamSet([p for p in ref.parameters()], exact_restore=False).perturb_(r.seed, off)
        with torch.no_grad():
            assert loss_of(ref, ForwardEngine())() == got


def test_explicit_bases_give_a_shard_the_z_of_the_whole_tensor():
    full, shard = nn.Linear(8, 6, bias=False), nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        shard.weight.copy_(full.weight[3:])                  # rows 3..5: elements 24.. of the whole tensor
    seen = []
    for m in (full, shard):
        m.register_forward_hook(lambda m, a, o: seen.append(m.weight.detach().clone()))
    x = torch.ones(1, 8)
    for m, bases in ((full, [0]), (shard, [24])):
        vp = VirtualPerturbation(m, [ParamSet([m.weight], bases=bases, exact_restore=False)])
        with torch.no_grad(), vp.perturbed(11, 0.25):
            m(x)
    assert torch.equal(seen[1], seen[0][3:]) and not torch.equal(seen[1], shard.weight)


# ------------------------------------------------------------------------------------------- trainer and CLI
def test_cli_virtual_signs_train_resume_and_replay_bit_exactly(data_dir, tmp_path):
    """Full-parameter bf16 with ``--perturb virtual --distribution rademacher``: the seed log says so; a run
    resumed from its log and ``replay`` both land on the uninterrupted run's bits."""
    import json
    from safetensors.torch import load_file
    from mezo_kernels.train.cli import main

    def train(out, steps, *extra):
        argv = ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(out), "--k", "4",
                "--batch-size", "4", "--eval-every", "0", "--eval-max", "4", "--no-progress", "--lr", "1e-2",
                "--eps", "1e-2", "--full-param", "--dtype", "bfloat16", "--perturb", "virtual", "--distribution",
                "rademacher", "--steps", str(steps), *extra]
        assert main(argv) == 0
    full, part = tmp_path / "full", tmp_path / "part"
    train(full, 4)
    train(part, 2)
    train(part, 4, "--resume")
    head = json.loads((full / "seeds.jsonl").read_text().splitlines()[0])
    assert (head["perturb"], head["distribution"], head["rounding"]) == ("virtual", "rademacher", "stochastic")
    assert main(["replay", "--run", str(full)]) == 0
    a, b, c = (load_file(str(d / "model.safetensors")) for d in (full / "model", part / "model", full / "replayed"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    init = models.load_model("tiny-llama", seed=0, dtype=torch.bfloat16)[0].state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)          # the steps did move the weights


# ------------------------------------------------------------------------------------------- large tensors in slices
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_large_embedding_and_head_go_in_slices_with_the_same_values(dist):
    """slice_bytes below the tied [11, 6] tensor: the embedding reads only its tokens' rows (bit-identical), the
    head runs in blocks of output rows (equal up to the matmul's summation order); peak = one slice (+ scale)."""
    torch.manual_seed(0)
    model = Tiny(torch.float32, seed=5)
    ps = ParamSet(list(model.parameters()), exact_restore=False, distribution=dist)
    whole, sliced = VirtualPerturbation(model, [ps], slice_bytes=None), VirtualPerturbation(model, [ps], 60)
    ids = torch.tensor([[1, 2, 2, 9], [9, 1, 0, 3]])
    outs = {}
    for name, vp in (("whole", whole), ("sliced", sliced)):
        with torch.no_grad(), vp.perturbed(4, 0.3):
            outs[name] = (model.emb(ids), model(ids))
    assert torch.equal(outs["sliced"][0], outs["whole"][0])
    torch.testing.assert_close(outs["sliced"][1], outs["whole"][1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outs["whole"][1], model(ids), atol=1e-3)            # it was perturbed
    # live at once: the root's ``scale`` (24 B) and one module's slices; the embedding reads 5 distinct rows
    # (5 x 24 B), lin (144 B > 60 B: sliced too) its perturbed bias and 1-row blocks (30 B), the head 1-row blocks
    row = 6 * 4
    assert sliced.peak_bytes == row + max(5 * row, row + row, row) and sliced.live_bytes == 0
    assert sliced.unreached == [] and "forward" not in vars(model.emb) and "forward" not in vars(model.head)

    def boom(m, a, o):
        raise Boom()
    h = model.lin.register_forward_hook(boom)
    with torch.no_grad(), pytest.raises(Boom), sliced.perturbed(4, 0.3):
        model(ids)
    h.remove()
    assert "forward" not in vars(model.emb) and sliced.live_bytes == 0


def test_an_output_that_views_its_weight_is_not_overwritten_by_the_next_module():
    class Table(nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)))

        def forward(self):
            return self.weight[1:3]                          # a view of the (transient) weight
    a, b = Table(1), Table(2)
    model = nn.ModuleList([a, b])
    ps = ParamSet([a.weight, b.weight], exact_restore=False)
    vp = VirtualPerturbation(model, [ps])
    with torch.no_grad(), vp.perturbed(3, 0.5):
        out_a = a()
        out_b = b()                                          # reuses the transient memory a's weight lived in
    assert torch.equal(out_a, ps.perturbed_copy(3, 0.5, 0)[1:3])
    assert torch.equal(out_b, ps.perturbed_copy(3, 0.5, 1)[1:3])
