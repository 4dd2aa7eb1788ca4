"""MeZO optimizer: convergence, unbiasedness, replay/resume bit-exactness, safety, bad input."""
import copy
import math

import pytest
import torch

import mezo_kernels as mk
from mezo_kernels.optim import MeZO, replay


def quad_problem(d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(d, generator=g)
    theta = torch.nn.Parameter(torch.zeros(d))
    return theta, target, lambda: 0.5 * float(((theta.detach() - target) ** 2).sum())


def test_converges_on_a_quadratic():
    theta, target, f = quad_problem()
    opt = MeZO([theta], lr=0.02, eps=1e-3, seed=1)
    start = f()
    for _ in range(600):
        opt.step(f)
    assert f() < 0.05 * start, (start, f())


def test_mean_update_points_along_autograd_gradient():
    """E[g z] = grad f for small eps: over N directions cos(mean update, grad) ~ 1/sqrt(1 + d/N).
    With d = 24 and N = 3000 the expectation is 0.996; we require > 0.95 (about 10 standard deviations of
    slack for this estimator), and the norm ratio within 15%."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 6) * 0.5)
    x, y = torch.randn(32, 6), torch.randn(32, 4)
    loss = lambda: torch.nn.functional.mse_loss(torch.tanh(x @ w.T), y)   # noqa: E731
    grad = torch.autograd.grad(loss(), w)[0]
    w0 = w.detach().clone()
    opt = MeZO([w], lr=1.0, eps=1e-3, n_directions=3000, seed=7, exact_restore=True)
    with torch.no_grad():
        opt.step(lambda: float(loss()))
    est = -(w.detach() - w0)
    cos = torch.nn.functional.cosine_similarity(est.flatten(), grad.flatten(), dim=0).item()
    assert cos > 0.95, cos
    assert abs(est.norm().item() / grad.norm().item() - 1) < 0.15


@pytest.mark.parametrize("dtype,exact", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, None)])
def test_replay_and_resume_are_bit_exact(dtype, exact):
    def make():
        g = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.randn(17, generator=g).to(dtype)),
                torch.nn.Parameter(torch.randn(3, 5, generator=g).to(dtype))]

    def loss_of(ps):
        return lambda: float(sum(((p.detach().float() - 1) ** 2).sum() for p in ps))

    kw = dict(lr=1e-2, eps=1e-2, weight_decay=0.1, seed=11, n_directions=2, exact_restore=exact)
    full = make()
    opt = MeZO([("w", full[0]), ("b.bias", full[1])], **kw)
    for _ in range(30):
        opt.step(loss_of(full))
    # replay from the initial weights
    rep = make()
    replay([("w", rep[0]), ("b.bias", rep[1])], opt.log, opt.config(), exact_restore=exact)
    assert all(torch.equal(a, b) for a, b in zip(full, rep))
    # a run killed after 12 steps and resumed from its log
    part = make()
    opt1 = MeZO([("w", part[0]), ("b.bias", part[1])], **kw)
    for _ in range(12):
        opt1.step(loss_of(part))
    state = opt1.state_dict()
    resumed = make()
    opt2 = MeZO([("w", resumed[0]), ("b.bias", resumed[1])], **kw)
    opt2.replay_(state["log"])
    opt2.load_state_dict(state)
    for _ in range(18):
        opt2.step(loss_of(resumed))
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
    assert opt2.log == opt.log


def test_exception_in_closure_leaves_weights_unperturbed():
    theta = torch.nn.Parameter(torch.randn(33))
    before = theta.detach().clone()
    opt = MeZO([theta], lr=0.1, eps=0.5, exact_restore=True)
    calls = []

    def closure():
        calls.append(theta.detach().clone())
        if len(calls) == 2:
            raise RuntimeError("boom")
        return 1.0
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert not torch.equal(calls[0], before)      # it was perturbed during the closure ...
    assert torch.equal(theta.detach(), before)    # ... and restored after the error
    assert opt.step_count == 0 and opt.log == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [0, 1])
def test_non_finite_loss_skips_the_step(bad, where):
    theta = torch.nn.Parameter(torch.randn(9).bfloat16())
    before = theta.detach().clone()
    opt = MeZO([theta], lr=0.1, eps=1e-2)
    n = [0]

    def closure():
        n[0] += 1
        return bad if n[0] - 1 == where else 1.0
    res = opt.step(closure)
    assert res.skipped and opt.skipped_directions == 1
    assert torch.equal(theta.detach(), before)
    assert opt.log[-1]["skip"] == ("plus" if where == 0 else "minus")


def test_micro_batches_share_one_direction():
    theta = torch.nn.Parameter(torch.zeros(8))
    seen = []
    opt = MeZO([theta], lr=0.0, eps=0.1)

    def closure(i):
        seen.append(theta.detach().clone())
        return float(i)
    res = opt.step(closure, micro_batches=3)
    assert len(seen) == 6
    assert all(torch.equal(seen[0], s) for s in seen[:3]) and all(torch.equal(seen[3], s) for s in seen[3:])
    assert torch.allclose(seen[0], -seen[3])
    assert res.loss_plus == res.loss_minus == 1.0 and res.grad == 0.0


def test_weight_decay_spares_biases_and_norms_and_zero_grads_are_counted():
    w = torch.nn.Parameter(torch.ones(4, 4))
    b = torch.nn.Parameter(torch.ones(4))
    opt = MeZO([("layer.weight", w), ("layer.bias", b)], lr=0.1, eps=1e-3, weight_decay=0.5, exact_restore=True)
    opt.step(lambda: 2.0)                                    # constant loss: g = 0, only decay acts
    assert torch.equal(b.detach(), torch.ones(4))
    assert torch.allclose(w.detach(), torch.full((4, 4), 0.95))
    assert opt.zero_grad_steps == 1
    assert len(opt.param_sets) == 2


def test_linear_schedule_and_seed_sequence():
    theta = torch.nn.Parameter(torch.zeros(3))
    opt = MeZO([theta], lr=1.0, schedule="linear", total_steps=10, n_directions=3)
    assert [opt.lr_at(t) for t in (0, 5, 10, 12)] == [1.0, 0.5, 0.0, 0.0]
    seeds = {opt.seed_for(t, j) for t in range(100) for j in range(3)}
    assert len(seeds) == 300 and all(0 <= s < 2**64 for s in seeds)
    assert MeZO([theta], lr=1.0, seed=5).seed_for(0) != opt.seed_for(0)


def test_bad_inputs():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        MeZO([], lr=0.1)
    for kw, msg in [(dict(lr=-1.0), "lr"), (dict(lr=math.nan), "lr"), (dict(lr=0.1, eps=0.0), "eps"),
                    (dict(lr=0.1, n_directions=0), "n_directions"), (dict(lr=0.1, schedule="cosine"), "schedule"),
                    (dict(lr=0.1, schedule="linear"), "total_steps"), (dict(lr=0.1, weight_decay=-1), "weight_decay")]:
        with pytest.raises(ValueError, match=msg):
            MeZO([p], **kw)
    with pytest.raises(ValueError, match="requires_grad"):
        MeZO([torch.zeros(3)], lr=0.1)
    opt = MeZO([p], lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)
    with pytest.raises(ValueError, match="micro_batches"):
        opt.step(lambda: 1.0, micro_batches=0)
    with pytest.raises(ValueError, match="eps"):
        MeZO([p], lr=0.1, eps=0.5).load_state_dict(opt.state_dict())


# ----------------------------------------------------------------------------------------- torch.optim integration
def _pair(dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [("layer.weight", torch.nn.Parameter(torch.randn(6, 5, generator=g).to(dtype))),
            ("layer.bias", torch.nn.Parameter(torch.randn(5, generator=g).to(dtype)))]


def _quad(named):
    return lambda: float(sum(((p.detach().float() - 0.5) ** 2).sum() for _, p in named))


def test_top_level_api_and_a_real_torch_optimizer():
    from mezo_kernels import MeZO as M, ParamSet, backends, fill_normal_, replay as r  # noqa: F401
    assert M is MeZO and r is replay and issubclass(MeZO, torch.optim.Optimizer)
    opt = MeZO(_pair(), lr=0.1, weight_decay=0.1)
    assert [g["param_names"] for g in opt.param_groups] == [["layer.weight"], ["layer.bias"]]
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_param_groups_carry_their_own_lr_and_weight_decay_and_replay():
    (nw, w), (nb, b) = _pair()
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = MeZO([{"params": [w], "lr": 0.1, "weight_decay": 0.5}, {"params": [b], "lr": 0.0}], lr=1.0,
               exact_restore=True)
    opt.step(lambda: 2.0)                              # constant loss: g = 0, only decay acts
    assert torch.allclose(w.detach(), w0 * 0.95) and torch.equal(b.detach(), b0)
    assert opt.log[-1]["groups"] == [[0.1, 0.5], [0.0, 0.0]]
    for _ in range(5):
        opt.step(_quad([(nw, w), (nb, b)]))
    assert torch.equal(b.detach(), b0)                  # lr 0 for the bias group, whatever g was
    cfg = opt.config()
    assert cfg["groups"] == [{"size": 1, "lr": 0.1, "weight_decay": 0.5}, {"size": 1, "lr": 0.0, "weight_decay": 0.0}]
    fresh = _pair()                                     # a flat list: the config's groups split it the same way
    replay(fresh, opt.state_dict())
    assert torch.equal(fresh[0][1], w) and torch.equal(fresh[1][1], b)


@pytest.mark.parametrize("make", [lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (t + 1)),
                                  lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6)])
def test_torch_lr_schedulers_drive_the_lr_the_kernels_use(make):
    named = _pair()
    opt = MeZO(named, lr=0.2, weight_decay=0.1)
    sched = make(opt)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step(_quad(named))
        sched.step()
    assert [r["lr"] for r in opt.log] == [s[0] for s in seen] and len({tuple(s) for s in seen}) > 1
    fresh = _pair()
    replay(fresh, opt.log, opt.config())                # the logged lrs are the ones the kernels applied
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fresh, named))


def test_no_decay_split_follows_hf_names():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, attention_bias=True)
    model = transformers.LlamaForCausalLM(cfg)
    opt = MeZO(model.named_parameters(), lr=0.1, weight_decay=0.1)
    hf = set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert set(opt.param_groups[0]["param_names"]) == hf
    assert set(opt.param_groups[1]["param_names"]) == {n for n, _ in model.named_parameters()} - hf
    explicit = MeZO(model.named_parameters(), lr=0.1, weight_decay=0.1, no_decay=["lm_head.weight"])
    assert explicit.param_groups[1]["param_names"] == ["lm_head.weight"]
    assert explicit.config()["no_decay"] == ["lm_head.weight"]
    by_fn = MeZO(model.named_parameters(), lr=0.1, weight_decay=0.1, no_decay=lambda n, t: "mlp" in n)
    assert all("mlp" in n for n in by_fn.param_groups[1]["param_names"])


def test_state_dict_resumes_bit_exactly_without_replay(tmp_path):
    named = _pair(torch.bfloat16)
    opt = MeZO(named, lr=1e-2, eps=1e-2, weight_decay=0.1, seed=4)
    for _ in range(5):
        opt.step(_quad(named))
    opt.param_groups[0]["lr"] = 5e-3                   # as a scheduler would
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    visible = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]   # what a checkpoint holds
    opt2 = MeZO(visible, lr=1e-2, eps=1e-2, weight_decay=0.1, seed=4)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert opt2.param_groups[0]["lr"] == 5e-3 and opt2.step_count == 5
    for _ in range(5):
        opt.step(_quad(named)); opt2.step(_quad(visible))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(named, visible)) and opt2.log == opt.log
    with pytest.raises(ValueError, match="not a MeZO state_dict"):
        opt2.load_state_dict({"state": {}, "param_groups": []})


def test_replay_from_the_log_alone(tmp_path):
    from mezo_kernels.optim.seedlog import SeedLogWriter
    named = _pair(torch.float32)
    opt = MeZO(named, lr=1e-2, eps=1e-2, weight_decay=0.1, seed=9, n_directions=2, exact_restore=False)
    for _ in range(6):
        opt.step(_quad(named))
    path = str(tmp_path / "seeds.jsonl")
    w = SeedLogWriter(path, opt.config()); w.append(opt.log); w.close()
    header = {"mezo_seed_log": 1, "config": opt.config()}
    for log in (path, (header, opt.log), opt.state_dict()):
        fresh = _pair(torch.float32)
        rep = replay(fresh, log)                        # exact_restore=False comes from the config
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fresh, named)) and rep.step_count == 6
    with pytest.raises(ValueError, match="carries no config"):
        replay(_pair(), list(opt.log))                  # bare records; opt.log itself carries its config
    with pytest.raises(ValueError, match="describe 3 tensors"):
        MeZO(_pair(), lr=0.1, groups=[{"size": 3, "lr": 0.1, "weight_decay": 0.0}])
    with pytest.raises(ValueError, match="param groups"):
        MeZO([{"params": [named[0][1]]}], lr=0.1, no_decay=["x"])


def test_modes_in_config_only_when_not_the_defaults_and_the_default_perturbation():
    w16 = torch.nn.Linear(3, 2).to(torch.bfloat16)
    w32 = torch.nn.Linear(3, 2)
    assert "perturb" not in MeZO(list(w32.parameters()), lr=0.1).config()            # as logs always were
    assert MeZO(list(w32.parameters()), lr=0.1, model=w32).perturb == "inplace"      # the default: in place,
    assert MeZO(list(w16.parameters()), lr=0.1, model=w16).perturb == "inplace"      # in every dtype
    virt = MeZO(list(w16.parameters()), lr=0.1, model=w16, perturb="virtual")
    assert virt.perturb == "virtual" and virt.rounding == "stochastic" and not virt.param_sets[0].exact_restore
    assert virt.config()["perturb"] == "virtual" and "rounding" not in virt.config()
    assert MeZO(list(w16.parameters()), lr=0.1).perturb == "inplace"                 # no model: in place
    cfg = MeZO(list(w32.parameters()), lr=0.1, distribution="rademacher", rounding="stochastic").config()
    assert (cfg["distribution"], cfg["rounding"]) == ("rademacher", "stochastic")
    with pytest.raises(ValueError, match="rounding must be"):
        MeZO(list(w32.parameters()), lr=0.1, rounding="down")
    with pytest.raises(ValueError, match="distribution"):
        MeZO(list(w32.parameters()), lr=0.1, distribution="uniform")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_with_stochastic_rounding_replays_bit_exactly(dtype):
    def run(w, steps):
        x = torch.linspace(-1, 1, 12).view(4, 3).to(dtype)
        opt = MeZO(list(w.parameters()), lr=0.05, eps=1e-2, seed=3, rounding="stochastic", exact_restore=False)
        with torch.no_grad():
            for _ in range(steps):
                opt.step(lambda: float(w(x).float().square().mean()))
        return opt
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2).to(dtype)
    b = copy.deepcopy(a)
    opt = run(a, 5)
    replay(list(b.parameters()), opt.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
