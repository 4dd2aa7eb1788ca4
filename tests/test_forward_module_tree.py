"""The forward engine sees every change to the module tree it runs, not only weight writes: adapters injected,
merged, unloaded or disabled, modules replaced or wrapped, another model. After a first (cached) forward and such
a change, the same engine must give exactly what a fresh engine gives, on every reuse path."""
import contextlib
import dataclasses
import gc

import pytest
import torch
from torch import nn

from mezo_kernels import models
from mezo_kernels.forward.engine import ForwardEngine
from mezo_kernels.forward.tree import ModuleTree
from test_forward import ATOL_F32
from test_forward_cache import _call, _plain, _rows

# reuse path -> (engine options, first LoRA layer: 1 leaves layer 0 frozen, which the frozen-layer reuse needs)
PATHS = {"prefix": (dict(frozen_reuse=False, eval_cache=False), 0),
         "frozen": (dict(prefix_reuse=False, eval_cache=False), 1),
         "eval-cache": (dict(frozen_reuse=False), 0),
         "all": ({}, 1)}


def _lora_b(model, seed=0):
    """Non-zero LoRA B, so that an adapter changes what the model computes."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n) + seed))
    return model


def _base(first, seed=5):
    """tiny-llama, full-parameter, with the embeddings and layers below ``first`` frozen (frozen-layer reuse)."""
    return _freeze(models.load_model("tiny-llama", seed=seed)[0], first)


def _freeze(model, first):
    model.model.embed_tokens.requires_grad_(False)
    for layer in model.model.layers[:first]:
        layer.requires_grad_(False)
    return model


def _adapted(first, seed=5):
    torch.manual_seed(seed)                        # peft draws LoRA A from the global generator
    return _lora_b(models.add_lora(models.load_model("tiny-llama", seed=seed)[0], first_layer=first))


# each change: (the model to start with, a context manager that changes it and yields the model to call)
@contextlib.contextmanager
def _inject(model, first):
    torch.manual_seed(1)
    yield _lora_b(models.add_lora(model, first_layer=first))     # peft injects in place: same base model object


@contextlib.contextmanager
def _merge_and_unload(model, first):
    yield model.merge_and_unload()


@contextlib.contextmanager
def _merge_adapter(model, first):
    model.merge_adapter()
    yield model


@contextlib.contextmanager
def _unload(model, first):
    yield model.unload()


@contextlib.contextmanager
def _disable(model, first):
    with model.disable_adapter():
        yield model


def _layer0(model):
    return models.unwrap(model).model.layers[0].self_attn


@contextlib.contextmanager
def _replace(model, first):
    torch.manual_seed(2)
    _layer0(model).q_proj = nn.Linear(64, 64, bias=False)
    yield model


@contextlib.contextmanager
def _wrap(model, first):
    """A new module that adds no parameter: every weight keeps its address and version."""
    _layer0(model).k_proj = nn.Sequential(_layer0(model).k_proj, nn.ReLU())
    yield model


@contextlib.contextmanager
def _other(model, first):
    yield _adapted(first, seed=6)


CHANGES = {"inject": (_base, _inject), "merge_and_unload": (_adapted, _merge_and_unload),
           "merge_adapter": (_adapted, _merge_adapter), "unload": (_adapted, _unload),
           "disable_adapter": (_adapted, _disable), "replace": (_adapted, _replace), "wrap": (_adapted, _wrap),
           "other_model": (_adapted, _other)}
SAME_FUNCTION = {"merge_and_unload", "merge_adapter"}       # merging keeps what the model computes (up to rounding)


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("path", PATHS)
def test_engine_sees_module_tree_changes(path, change):
    kw, first = PATHS[path]
    start, change_fn = CHANGES[change]
    model = start(first)
    rows = _rows(3)
    eng = ForwardEngine(**kw)
    before = _call(eng, model, rows)
    assert torch.equal(_call(eng, model, rows), before)       # caches warm (and, where they apply, hit)
    if path in ("frozen", "all"):
        assert eng.stats.frozen_hits == 1
    with change_fn(model, first) as changed:
        after = _call(eng, changed, rows)
        fresh = _call(ForwardEngine(**kw), changed, rows)
        assert torch.equal(after, fresh)
        torch.testing.assert_close(after, _plain(changed, rows), atol=ATOL_F32, rtol=1e-5)
        if change in SAME_FUNCTION:
            torch.testing.assert_close(after, before, atol=ATOL_F32, rtol=1e-5)
        else:
            assert not torch.allclose(after, before, atol=1e-3)     # the change is visible: the test can fail
        assert eng.stats.fallback is None
    if change == "disable_adapter":        # adapters back on: the adapted results again
        assert torch.equal(_call(eng, model, rows), before)


def test_disable_adapter_keeps_frozen_layer_reuse():
    """Only the frozen layers' own switches key a frozen-layer state: disabling the adapters of the trainable layer
    1 still reuses the state entering it (and gives the base model's results)."""
    model = _adapted(1)
    rows = _rows(4)
    eng = ForwardEngine()
    _call(eng, model, rows)
    with model.disable_adapter():
        off = _call(eng, model, rows)
        torch.testing.assert_close(off, _plain(model, rows), atol=ATOL_F32, rtol=1e-5)
    assert eng.stats.frozen_hits == 1 and eng.stats.frozen_misses == 1


def test_tree_key_never_collides_after_a_model_is_freed():
    """A model freed and another built like it may reuse the freed modules' ids; the engine holds the tree it
    keys on, so the old ids stay taken and the new model gets its own runner and caches."""
    rows = _rows(5)
    eng = ForwardEngine()
    _call(eng, _adapted(1, seed=5), rows)          # the model itself is dropped at once
    gc.collect()
    other = _adapted(1, seed=7)
    torch.testing.assert_close(_call(eng, other, rows), _plain(other, rows), atol=ATOL_F32, rtol=1e-5)
    assert eng.stats.frozen_hits == 0


def test_module_tree_key():
    model = _adapted(0)
    a = ModuleTree(models.unwrap(model))
    assert a.same_objects(ModuleTree(models.unwrap(model))) and a.state == ModuleTree(models.unwrap(model)).state
    with model.disable_adapter():          # same objects, another switch
        b = ModuleTree(models.unwrap(model))
        assert a.same_objects(b) and a.state != b.state
    model.train()
    assert ModuleTree(models.unwrap(model)).state != a.state
    model.eval()
    _layer0(model).o_proj = nn.Linear(64, 64, bias=False)
    assert not a.same_objects(ModuleTree(models.unwrap(model)))


# ------------------------------------------------------------------------------------------------ the objective
def _sst2(data_dir):
    from mezo_kernels.tasks import data
    return data.load_task_splits("sst2", data_dir, "kshot", 16, 0).test


def _adapter_dir(tmp_path, cfg):
    from mezo_kernels.train.loop import build
    model, *_ = build(dataclasses.replace(cfg, lora=True))
    _lora_b(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


@pytest.mark.parametrize("how", ["get_peft_model", "from_pretrained"])
@pytest.mark.parametrize("first", [0, 1])
def test_objective_evaluates_the_adapted_model(tmp_path, data_dir, how, first):
    """The reported case: an objective that ran the base model, then an adapter injected into that model in place."""
    from peft import PeftModel
    from mezo_kernels.train.config import TrainConfig
    from mezo_kernels.train.loop import build, evaluate
    cfg = TrainConfig(model="tiny-llama", lora=False, data_dir=data_dir, lora_first_layer=first)
    ex = _sst2(data_dir)
    model, _, _, obj, _ = build(cfg)
    base = evaluate(_freeze(model, first), obj, ex)
    if how == "get_peft_model":
        adapted = _lora_b(models.add_lora(model, first_layer=first))
    else:
        adapted = PeftModel.from_pretrained(model, str(_adapter_dir(tmp_path, cfg)))
    got = evaluate(adapted, obj, ex)
    want = evaluate(adapted, build(cfg)[3], ex)             # a fresh objective on the adapted model
    assert got == want and got["loss"] != base["loss"]
    assert obj.engine.stats.fallback is None
