"""± and n directions in one batched forward (LoRA): the losses equal the sequential path's, the stored weights are
never written (also when the forward raises), chunking changes nothing, a NaN stays in its own direction, and the
forward engine keeps its reuses under row groups."""
import math

import pytest
import torch

from mezo_kernels.tasks.records import Example
from mezo_kernels.tasks.spec import task_from_dict
from mezo_kernels import _compat, models
from mezo_kernels.tasks import data, objectives, registry as tasks
from mezo_kernels.train.batched_pm import batched_pm_losses, make_pm_fn, pm_grads, tile_encoding
from mezo_kernels.forward.engine import ForwardEngine
from mezo_kernels.virtual.grouped_lora import GroupedLoRA
from mezo_kernels.perturb import ParamSet

TOL = 1e-5
EPS = 1e-2
SEEDS = [11, 202, 3003, 40004]
LEAD = "the movie was a long walk through good and bad and fun and boring scenes"
WORDS = ["fun", "bad", "plot", "film", "good", "acting"]
MULTI = task_from_dict({"name": "multi", "verbalizer": {0: "very bad", 1: "quite good fun"},
                              "template": "*cls**sent_0*_It_was*mask*.*sep+*",
                              "causal_template": "{text_a} It was {mask}",
                              "columns": {"text_a": "sentence", "label": "label"}})


def _model(first_layer=0, kind="tiny-llama"):
    model, tok, _ = models.load_model(kind, seed=5)
    torch.manual_seed(5)                           # peft draws LoRA A from the global generator
    model = models.add_lora(model, first_layer=first_layer)
    with torch.no_grad():                          # B starts at 0; give the adapters a visible effect
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    return model, tok


def _batch():
    return [Example(f"{LEAD} {w} {w}", None, i % 2) for i, w in enumerate(WORDS)]


def _engine(name):
    return {"reuse": ForwardEngine(), "no-prefix": ForwardEngine(prefix_reuse=False, eval_cache=False),
            "plain": ForwardEngine.plain(), "none": None}[name]


def _sequential(model, obj, batch, params, seeds, eps=EPS):
    """The sequential path: weights round(theta + eps*z), then round(theta - eps*z) (fp32 masters make both
    exact), the objective's mean CE."""
    ps = ParamSet(params, exact_restore=True)
    out = []
    with torch.no_grad():
        for s in seeds:
            with ps.perturbed(s, eps):
                lp = obj(model, batch).loss.item()
            with ps.perturbed(s, -eps):
                lm = obj(model, batch).loss.item()
            out.append((lp, lm))
    return out


def _close(a, b, tol=TOL):
    return all(math.isclose(x, y, abs_tol=tol) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("first_layer", [0, 1])
@pytest.mark.parametrize("engine", ["reuse", "no-prefix", "plain", "none"])
def test_batched_equals_sequential(n, first_layer, engine):
    model, tok = _model(first_layer)
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"), engine=_engine(engine))
    params = models.trainable_parameters(model)
    seq = _sequential(model, obj, _batch(), params, SEEDS[:n])
    bat = batched_pm_losses(model, obj, _batch(), SEEDS[:n], EPS, ParamSet(params))
    assert len(bat) == n and _close(seq, bat), (seq, bat)
    assert all(lp != lm for lp, lm in bat)         # the perturbation reached the loss
    eng = obj.engine
    if engine == "plain":
        assert eng.stats.fallback == "reuse is off" and eng.stats.grouped_forwards == 1
    elif eng is not None:
        assert eng.stats.fallback is None and eng.stats.grouped_forwards == 1


@pytest.mark.parametrize("engine", ["reuse", "plain"])
def test_multi_token_candidates(engine):
    """Candidates of several tokens: one row per (example, candidate); the target indices shift per group."""
    model, tok = _model(1)
    obj = objectives.CausalLMObjective(tok, MULTI, engine=_engine(engine))
    enc = obj.encode(_batch())
    assert enc["input_ids"].shape[0] == 2 * len(WORDS)
    params = models.trainable_parameters(model)
    seq = _sequential(model, obj, _batch(), params, SEEDS[:2])
    assert _close(seq, batched_pm_losses(model, obj, _batch(), SEEDS[:2], EPS, ParamSet(params)))


def test_masked_lm_objective():
    model, tok = _model(0, "tiny-roberta")
    obj = objectives.MaskedLMObjective(tok, tasks.get_task("sst2"))
    params = models.trainable_parameters(model)
    seq = _sequential(model, obj, _batch(), params, SEEDS[:2])
    assert _close(seq, batched_pm_losses(model, obj, _batch(), SEEDS[:2], EPS, ParamSet(params)))


def test_engine_reuse_under_row_groups():
    """Layers below the first LoRA layer run once for all 2n groups (and share the state of sequential
    forwards); the shared prompt runs once per group; the eval cache is neither read nor written."""
    model, tok = _model(1)
    eng = ForwardEngine()
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"), engine=eng)
    params = models.trainable_parameters(model)
    with torch.no_grad():
        obj(model, _batch())                       # a plain forward: frozen state stored, eval cache off (k > 0)
    eng.reset_stats()
    batched_pm_losses(model, obj, _batch(), SEEDS, EPS, ParamSet(params))
    s = eng.stats
    assert s.frozen_hits == 1 and s.frozen_misses == 0 and s.prefix_cache_hits == 0
    rows = obj.encode(_batch())["input_ids"]
    # only layer 1 of 2 ran, once per group (8 groups), on a shared prompt computed per group: less than plain
    assert s.plain_token_layers == 8 * rows.numel() * 2
    assert 0 < s.run_token_layers < 8 * rows.numel()
    assert s.saved_fraction > 0.5


def test_engine_eval_cache_untouched_by_row_groups():
    model, tok = _model(0)
    eng = ForwardEngine()
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"), engine=eng)
    with torch.no_grad():
        clean = obj(model, _batch()).logits
    stored = dict(eng._kv)
    batched_pm_losses(model, obj, _batch(), SEEDS[:1], EPS, ParamSet(models.trainable_parameters(model)))
    assert eng._kv.keys() == stored.keys()
    with torch.no_grad():
        again = obj(model, _batch()).logits        # served from the eval cache stored before: still the clean model
    assert torch.equal(clean, again) and eng.stats.prefix_cache_hits > 0


def test_max_rows_chunks_give_the_same_losses():
    model, tok = _model(1)
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"), engine=ForwardEngine())
    ps = ParamSet(models.trainable_parameters(model))
    rows = obj.encode(_batch())["input_ids"].shape[0]
    whole = batched_pm_losses(model, obj, _batch(), SEEDS, EPS, ps)
    for max_rows in (1, rows, 3 * rows, 100 * rows):
        eng_before = obj.engine.stats.grouped_forwards
        assert _close(whole, batched_pm_losses(model, obj, _batch(), SEEDS, EPS, ps, max_rows=max_rows))
        forwards = obj.engine.stats.grouped_forwards - eng_before
        assert forwards == {1: 8, rows: 8, 3 * rows: 3, 100 * rows: 1}[max_rows]


def _state(params):
    return [(p.detach().clone(), p._version) for _, p in params]


def _same(params, state):
    return all(torch.equal(p.detach(), t) and p._version == v for (_, p), (t, v) in zip(params, state))


def test_stored_weights_untouched():
    model, tok = _model(1)
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"), engine=ForwardEngine())
    params = models.trainable_parameters(model)
    before = _state(params)
    batched_pm_losses(model, obj, _batch(), SEEDS, EPS, ParamSet(params))
    assert _same(params, before)


def test_exception_inside_the_forward_leaves_everything_as_it_was():
    model, tok = _model(1)
    eng = ForwardEngine()
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"), engine=eng)
    params = models.trainable_parameters(model)
    with torch.no_grad():
        clean = obj(model, _batch()).logits
    before = _state(params)
    ps = ParamSet(params)
    grouped = GroupedLoRA(model, ps)

    def boom(module, args, out):
        raise RuntimeError("boom")

    handle = grouped.layers[0][1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        batched_pm_losses(model, obj, _batch(), SEEDS, EPS, ps)
    handle.remove()
    assert _same(params, before)
    assert all(not mod._forward_hooks and not mod.disable_adapters for _, mod, _ in grouped.layers)
    with torch.no_grad():                          # peft's own delta is back, the engine is out of row groups
        assert torch.equal(obj(model, _batch()).logits, clean) and eng._groups is None


def test_nan_stays_in_its_direction(monkeypatch):
    model, tok = _model(1)
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"), engine=ForwardEngine())
    ps = ParamSet(models.trainable_parameters(model))
    clean = batched_pm_losses(model, obj, _batch(), SEEDS, EPS, ps)
    real = ParamSet.perturbed_copies

    def poisoned(self, seed, offset):
        out = real(self, seed, offset)
        if seed == SEEDS[1] and offset > 0:
            out[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(ParamSet, "perturbed_copies", poisoned)
    got = batched_pm_losses(model, obj, _batch(), SEEDS, EPS, ps)
    assert math.isnan(got[1][0]) and got[1][1] == clean[1][1]
    assert [got[j] for j in (0, 2, 3)] == [clean[j] for j in (0, 2, 3)]
    grads = pm_grads(got, EPS)
    assert grads[1] == (0.0, "plus") and all(skip is None for _, skip in (grads[0], grads[2], grads[3]))
    assert grads[0][0] == float(torch.tensor((got[0][0] - got[0][1]) / (2 * EPS)))


def test_refusals():
    model, tok = _model(1)
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"))
    ps = ParamSet(models.trainable_parameters(model))
    with pytest.raises(ValueError, match="LoRA adapter weights only"):
        batched_pm_losses(model, obj, _batch(), SEEDS[:1], EPS,
                          ParamSet([(n, p) for n, p in model.named_parameters() if "embed" in n]))
    with pytest.raises(TypeError, match="encode"):
        batched_pm_losses(model, lambda m, b: 0.0, _batch(), SEEDS[:1], EPS, ps)
    for bad in dict(eps=0.0), dict(eps=float("nan")), dict(max_rows=0), dict(seeds=[]):
        args = dict(seeds=SEEDS[:1], eps=EPS, max_rows=None) | bad
        with pytest.raises(ValueError):
            batched_pm_losses(model, obj, _batch(), args["seeds"], args["eps"], ps, max_rows=args["max_rows"])
    eng = ForwardEngine()
    ids = torch.tensor([[5, 6, 7], [5, 6, 8]])
    with eng.row_groups(2), pytest.raises(ValueError, match="same rows"):
        eng.logits_at(model, ids, torch.ones_like(ids), torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(ValueError, match="row groups"):
        with eng.row_groups(0):
            pass


def test_tile_encoding_shifts_indices():
    enc = {"input_ids": torch.arange(6).view(3, 2), "attention_mask": torch.ones(3, 2), "tgt_r": torch.tensor([0, 2]),
           "tgt_pos": torch.tensor([1, 1]), "tgt_ids": torch.tensor([4, 5]), "tgt_row": torch.tensor([0, 3]),
           "cont_len": torch.ones(4), "labels": torch.tensor([0, 1])}
    t = tile_encoding(enc, 3)
    assert t["tgt_r"].tolist() == [0, 2, 3, 5, 6, 8] and t["tgt_row"].tolist() == [0, 3, 4, 7, 8, 11]
    assert torch.equal(t["input_ids"], enc["input_ids"].repeat(3, 1)) and t["labels"].tolist() == [0, 1] * 3
    with pytest.raises(ValueError, match="not known"):
        tile_encoding({**enc, "extra": torch.ones(1)}, 2)


def test_compat_lora_contract():
    """What grouped_lora relies on in peft: the adapters' weights and scaling, and a flag that skips the delta."""
    model, _ = _model(1)
    lora = [m for m in model.modules() if _compat.lora_adapters(m)]
    assert lora and _compat.lora_adapters(torch.nn.Linear(2, 2)) is None
    mod = lora[0]
    (ad,) = _compat.lora_adapters(mod)
    x = torch.randn(3, ad.A.shape[1])
    with torch.no_grad():
        full = mod(x)
        with _compat.lora_delta_off([mod]):
            base = mod(x)
        torch.testing.assert_close(full - base, ad.scaling * (x @ ad.A.T) @ ad.B.T, atol=1e-6, rtol=1e-5)
        assert torch.equal(mod(x), full) and all(p.requires_grad for p in (ad.A, ad.B))


def test_step_batched_replays_bit_exactly():
    """Through the optimizer: same losses as its sequential virtual step, and the seed log replays bit for bit."""
    from mezo_kernels.optim import MeZO, replay
    if not hasattr(MeZO, "step_batched"):
        pytest.skip("MeZO.step_batched(pm_fn) is not wired yet (optim.py)")
    model, tok = _model(1)
    obj = objectives.CausalLMObjective(tok, tasks.get_task("sst2"), engine=ForwardEngine())
    params = models.trainable_parameters(model)
    init = [p.detach().clone() for _, p in params]
    opt = MeZO(params, lr=1e-2, eps=EPS, seed=3, n_directions=2, perturb="virtual", model=model)
    for _ in range(3):
        opt.step_batched(make_pm_fn(model, obj, _batch(), opt.param_sets))
    trained = [p.detach().clone() for _, p in params]
    with torch.no_grad():
        for (_, p), t in zip(params, init):
            p.copy_(t)
    replay(params, opt.state_dict(), model=model)
    assert all(torch.equal(p.detach(), t) for (_, p), t in zip(params, trained))


def test_refuses_a_perturbed_adapter_marked_frozen():
    model, tok = _model(1)
    params = models.trainable_parameters(model)
    params[0][1].requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad is False"):
        GroupedLoRA(model, ParamSet(params))
