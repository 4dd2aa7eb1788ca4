"""Forward-engine caches: never stale after any weight write, eval-cache hits, frozen-layer reuse inside MeZO
steps (exact), and the trainer's --no-prefix-reuse giving the same per-step losses."""
import json

import pytest
import torch

import mezo_kernels as mk
from mezo_kernels.tasks.records import Example
from mezo_kernels.tasks.spec import task_from_dict
from mezo_kernels import models
from mezo_kernels.forward.engine import ForwardEngine
from mezo_kernels.optim import MeZO
from test_forward import ATOL_F32, _batch, _requests, _rows


def _model(first_layer=0, seed=5):
    model, _, _ = models.load_model("tiny-llama", seed=seed)
    torch.manual_seed(seed)                        # peft draws LoRA A from the global generator
    model = models.add_lora(model, first_layer=first_layer)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    return model


def _call(eng, model, rows):
    ids, mask = _batch(rows)
    with torch.no_grad():
        return eng.logits_at(model, ids, mask, *_requests(rows, mask))


def _plain(model, rows):
    return _call(ForwardEngine.plain(), model, rows)


@pytest.mark.parametrize("write", ["paramset", "inplace", "replace", "frozen_inplace"])
@pytest.mark.parametrize("first_layer", [0, 1], ids=["eval-cache", "frozen-cache"])
def test_no_stale_reuse_after_any_weight_write(write, first_layer):
    model = _model(first_layer=first_layer)
    rows = _rows(3)
    eng = ForwardEngine()
    before = _call(eng, model, rows)
    assert torch.equal(_call(eng, model, rows), before)       # same weights: cached and equal
    hits = (eng.stats.prefix_cache_hits, eng.stats.frozen_hits)
    assert hits[first_layer] > 0               # layer 0 trainable: the prefix (eval) cache hit; else frozen
    params = models.trainable_parameters(model)
    with torch.no_grad():
        if write == "paramset":        # our kernels write through raw pointers; ParamSet bumps the versions
            # the model lives on the CPU: use the C++ CPU kernel when it is built (None = no reason it cannot run)
            backend = "cpu" if mk.backends("cpu")["cpu"] is None else "auto"
            mk.ParamSet([p for _, p in params], backend=backend).perturb_(7, 0.5)
        elif write == "inplace":
            params[0][1].add_(0.5)
        elif write == "replace":
            name, p = params[-1]
            p.data = p.data + 0.5
        else:                          # a *frozen* layer-0 weight: the frozen-layer cache must notice too
            model.get_base_model().model.layers[0].mlp.up_proj.weight.mul_(1.5)
    after = _call(eng, model, rows)
    assert eng.stats.prefix_cache_hits == hits[0]             # a prefix's K/V depends on every weight: no hit
    # the state entering layer 1 depends on layer 0 and the embeddings only: still valid after a write to the
    # trainable layer-1 LoRA weights (and used), invalid after a write to a frozen layer-0 weight
    frozen_valid = first_layer == 1 and write != "frozen_inplace"
    assert eng.stats.frozen_hits == hits[1] + int(frozen_valid)
    torch.testing.assert_close(after, _plain(model, rows), atol=ATOL_F32, rtol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def test_frozen_state_never_keeps_eval_cache_kv():
    """Eval-cache K/V belong to one weight version; a frozen-layer state is reused across versions. Batch B's
    state is built while batch A's template segment sits in the eval cache; after a trainable-weight update, B's
    frozen hit must not reuse that segment's old K/V."""
    model = _model(first_layer=1)
    g = torch.Generator().manual_seed(8)
    template = torch.randint(10, 500, (16,), generator=g).tolist()
    rows = [template + torch.randint(10, 500, (8,), generator=g).tolist() for _ in range(6)]
    a, b = rows[:3], rows[3:]
    eng = ForwardEngine()
    _call(eng, model, a)
    _call(eng, model, b)
    assert eng.stats.prefix_cache_lookups == 2              # one template segment per batch
    with torch.no_grad():
        models.trainable_parameters(model)[-1][1].add_(0.3)
    hits = eng.stats.frozen_hits
    torch.testing.assert_close(_call(eng, model, b), _plain(model, b), atol=ATOL_F32, rtol=1e-5)
    assert eng.stats.frozen_hits == hits + 1


def test_eval_cache_serves_later_batches():
    model = _model()
    rows = _rows(4, n=12, shared=20)
    eng = ForwardEngine()
    outs = [_call(eng, model, rows[i:i + 4]) for i in (0, 4, 8)]
    assert eng.stats.prefix_cache_hits >= 1 and eng.stats.prefix_hit_rate > 0
    for i, o in zip((0, 4, 8), outs):
        torch.testing.assert_close(o, _plain(model, rows[i:i + 4]), atol=ATOL_F32, rtol=1e-5)


def test_no_caching_while_grad_is_enabled():
    model = _model(first_layer=1)
    rows = _rows(5)
    ids, mask = _batch(rows)
    eng = ForwardEngine()
    for _ in range(2):
        eng.logits_at(model, ids, mask, *_requests(rows, mask)).sum().backward()
    assert eng.stats.frozen_hits == 0 and eng.stats.prefix_cache_hits == 0 and not eng._kv and not eng._frozen


def _losses(model, engine, steps=6, n_dir=2):
    rows = _rows(6, n=6)
    ids, mask = _batch(rows)
    rr, cc = _requests(rows, mask)
    params = models.trainable_parameters(model)
    opt = MeZO(params, lr=1e-2, eps=1e-2, seed=1, n_directions=n_dir)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            res = opt.step(lambda: float(engine.logits_at(model, ids, mask, rr, cc).float().logsumexp(-1).mean()))
        out.append((res.loss_plus, res.loss_minus))
    return out, [p.detach().clone() for _, p in params]


def test_frozen_layer_reuse_is_exact_in_mezo_steps():
    """LoRA on layer 1 only: the state entering layer 1 is computed once per step and reused by all 2n forwards;
    losses and weights are bit-identical to the same engine without frozen-layer reuse."""
    eng = ForwardEngine(eval_cache=False)
    a, wa = _losses(_model(first_layer=1), eng)
    b, wb = _losses(_model(first_layer=1), ForwardEngine(frozen_reuse=False, eval_cache=False))
    assert a == b and all(torch.equal(x, y) for x, y in zip(wa, wb))
    # 6 steps x 2 directions x 2 forwards on one batch whose frozen part never changes: a single miss
    assert eng.stats.frozen_misses == 1 and eng.stats.frozen_hits == 6 * 4 - 1
    c, _ = _losses(_model(first_layer=1), ForwardEngine.plain())
    torch.testing.assert_close(torch.tensor(a), torch.tensor(c), atol=1e-5, rtol=1e-5)


def test_train_cli_no_prefix_reuse_same_losses(tmp_path, data_dir):
    from mezo_kernels.train.cli import main
    runs = {}
    for flag in ([], ["--no-prefix-reuse"]):       # LoRA on layer 1 of 2: frozen-layer reuse applies
        out = tmp_path / ("plain" if flag else "reuse")
        rc = main(["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(out), "--k", "8",
                   "--steps", "8", "--eval-every", "0", "--eval-max", "8", "--no-progress",
                   "--lora-first-layer", "1", *flag])
        assert rc == 0
        runs[bool(flag)] = ([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()],
                            json.loads((out / "summary.json").read_text()))
    (reuse, s_reuse), (plain, s_plain) = runs[False], runs[True]
    assert s_reuse["forward"]["frozen_hits"] >= 8 and s_reuse["forward"]["fallback"] is None
    assert s_plain["forward"]["fallback"] == "reuse is off"
    for r, p in zip(reuse, plain):
        assert r["loss_plus"] == pytest.approx(p["loss_plus"], abs=1e-5)
        assert r["loss_minus"] == pytest.approx(p["loss_minus"], abs=1e-5)


def test_objective_shares_a_common_prompt_prefix():
    """Examples whose text starts alike share that prefix in the objective's batch: same scores, less work."""
    from mezo_kernels.tasks import data, objectives, registry as tasks
    model, tok, _ = models.load_model("tiny-llama", seed=2)
    lead = "the movie was a long walk through good and bad and fun and boring scenes"
    batch = [Example(f"{lead} {w} {w}", None, i % 2) for i, w in enumerate(["fun", "bad", "plot", "film"])]
    task = tasks.get_task("sst2")
    eng = ForwardEngine()
    with torch.no_grad():
        plain = objectives.CausalLMObjective(tok, task, engine=ForwardEngine.plain())(model, batch)
        reuse = objectives.CausalLMObjective(tok, task, engine=eng)(model, batch)
    assert eng.stats.saved_fraction > 0.3
    torch.testing.assert_close(reuse.logits, plain.logits, atol=ATOL_F32, rtol=1e-5)
