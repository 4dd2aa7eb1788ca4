"""± and n low-rank directions in one batched forward (issue 21, item 2): the losses equal the sequential path's
(in-place low-rank perturbation, fp32 masters) with and without the forward engine, full-parameter and LoRA, lazy
V pairs included; the stored weights are never written; a step_batched run replays bit for bit."""
import math

import pytest
import torch

from mezo_kernels import models
from mezo_kernels.forward.engine import ForwardEngine
from mezo_kernels.optim import MeZO, replay
from mezo_kernels.perturb import ParamSet
from mezo_kernels.tasks import objectives, registry as tasks
from mezo_kernels.train.batched_pm import batched_pm_losses, make_pm_fn
from test_batched_pm import EPS, _batch

SEEDS = [11, 202, (3003, 17)]


def _model(lora):
    model, tok, _ = models.load_model("tiny-llama", seed=5)
    torch.manual_seed(5)
    if lora:
        model = models.add_lora(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model.eval(), tok


def _sequential(model, obj, params, seeds):
    ps = ParamSet(params, exact_restore=True, lowrank_r=2)
    out = []
    with torch.no_grad():
        for s in seeds:
            pair = []
            for sign in (1, -1):
                with ps.perturbed(s, sign * EPS):
                    pair.append(obj(model, _batch()).loss.item())
            out.append(tuple(pair))
    return out


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("engine", ["reuse", "none"])
def test_batched_lowrank_equals_sequential(lora, engine):
    model, tok = _model(lora)
    eng = ForwardEngine() if engine == "reuse" else None
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"), engine=eng)
    params = models.trainable_parameters(model)
    before = [(p.data_ptr(), p._version, p.detach().clone()) for _, p in params]
    seq = _sequential(model, obj, params, SEEDS)
    bat = batched_pm_losses(model, obj, _batch(), SEEDS, EPS, ParamSet(params, lowrank_r=2))
    assert all(math.isclose(x, y, rel_tol=2e-5) for a, b in zip(seq, bat) for x, y in zip(a, b)), (seq, bat)
    assert all(lp != lm for lp, lm in bat)
    assert all(p.data_ptr() == ptr and p._version >= v and torch.equal(p, t)
               for (_, p), (ptr, v, t) in zip(params, before))


def test_step_batched_replays_bit_for_bit():
    model, tok = _model(False)
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"), engine=ForwardEngine())
    params = models.trainable_parameters(model)
    opt = MeZO(params, lr=1e-3, eps=EPS, seed=4, model=model, distribution="lowrank", lowrank_r=2, n_directions=2)
    for _ in range(2):
        opt.step_batched(make_pm_fn(model, obj, _batch(), opt.param_sets))
    fresh, _ = _model(False)
    replay(models.trainable_parameters(fresh), opt.log, model=fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), _model(False)[0].parameters()))
