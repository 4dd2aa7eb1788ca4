"""MeZO optimizer: convergence, unbiasedness, replay/resume bit-exactness, safety, bad input."""
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
