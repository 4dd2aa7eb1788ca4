"""MeZOTrainer on a tiny random Llama: equals a plain MeZO loop, gradient accumulation, bit-exact resume, HF
schedules drive the kernels' lr, evaluation on unperturbed weights, clear construction errors."""
import math

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from transformers import (LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments,  # noqa: E402
                          get_cosine_schedule_with_warmup)

from mezo_kernels import MeZO, replay  # noqa: E402
from mezo_kernels.hf import MeZOTrainer  # noqa: E402

VOCAB, LEN = 64, 10


def tiny(seed=0, dtype=torch.float32):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).to(dtype)


def rows(n, seed=0):
    return torch.randint(0, VOCAB, (n, LEN), generator=torch.Generator().manual_seed(seed))


def dataset(ids):
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def targs(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=4,
                lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                logging_steps=1, seed=3)
    return TrainingArguments(**{**base, **kw})


def plain_loop(model, opt, ids, steps):
    """``steps`` MeZO steps of ``opt`` on ``model``'s causal-LM loss over ``ids``, as the Trainer computes it."""
    n = ids[:, 1:].numel()
    with torch.no_grad():
        for _ in range(steps):
            opt.step(lambda: model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(n)).loss)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_equals_a_plain_mezo_loop_and_evaluates_unperturbed(tmp_path):
    ids = rows(1)
    model = tiny()
    w0 = weights(model)
    args = targs(tmp_path, per_device_train_batch_size=1, weight_decay=0.1, eval_strategy="steps", eval_steps=2,
                 per_device_eval_batch_size=1)
    tr = MeZOTrainer(model=model, args=args, train_dataset=dataset(ids), eval_dataset=dataset(rows(1, seed=9)),
                     eps=1e-3)
    tr.train()
    # the no-decay group is exactly HF's: every name the Trainer would not decay, and nothing else
    decay = set(tr.get_decay_parameter_names(model))
    groups = tr.mezo.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert set(groups[0]["param_names"]) == decay and not set(groups[1]["param_names"]) & decay
    # a plain MeZO loop over the same batch lands on the same bits
    ref = tiny()
    opt = MeZO(ref.named_parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=3)
    plain_loop(ref, opt, ids, steps=4)
    got = weights(model)
    assert all(torch.equal(got[k], v) for k, v in weights(ref).items())
    assert any(not torch.equal(got[k], w0[k]) for k in w0)
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert [h["projected_grad"] for h in logs] == pytest.approx([r["g"] for r in opt.log], rel=1e-6)
    assert all(h["zero_grad_rate"] == 0.0 and h["skipped"] == 0 and "grad_norm" not in h for h in logs)
    # evaluation at step 2 saw the weights after 2 updates, unperturbed
    ev = next(h for h in tr.state.log_history if "eval_loss" in h and h["step"] == 2)
    at2 = tiny()
    replay(at2.named_parameters(), opt.log[:2], opt.config())
    eids = rows(1, seed=9)
    with torch.no_grad():
        assert ev["eval_loss"] == pytest.approx(float(at2(input_ids=eids, labels=eids).loss), rel=1e-6)


def test_gradient_accumulation_equals_one_batch_of_twice_the_size(tmp_path):
    """Same z, one update per cycle; the losses differ only by summation order, which g = (l+ - l-) / 2eps
    amplifies by 1/2eps: a larger eps keeps that rounding below the fp32 tolerance on the weights."""
    ids = rows(4)
    runs = {}
    for bs, ga in ((4, 1), (2, 2)):
        model = tiny()
        args = targs(tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=3)
        tr = MeZOTrainer(model=model, args=args, train_dataset=dataset(ids), eps=5e-2)
        tr.train()
        runs[ga] = (weights(model), tr.mezo.log, [h["loss"] for h in tr.state.log_history if "loss" in h])
    (w1, log1, loss1), (w2, log2, loss2) = runs[1], runs[2]
    assert len(log1) == len(log2) == 3                  # one update per cycle
    assert [r["seed"] for r in log1] == [r["seed"] for r in log2]
    assert [r["g"] for r in log2] == pytest.approx([r["g"] for r in log1], rel=1e-4, abs=1e-5)
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    assert all(torch.allclose(w2[k], w1[k], rtol=0, atol=1e-6) for k in w1)


class _Snap(TrainerCallback):
    def __init__(self):
        self.at = {}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.at[state.global_step] = weights(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_a_checkpoint_is_bit_exact(tmp_path, dtype):
    ds = dataset(rows(8))
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, weight_decay=0.05, lr_scheduler_type="linear")
    model = tiny(dtype=dtype)
    tr = MeZOTrainer(model=model, args=targs(tmp_path / "a", **kw), train_dataset=ds)
    tr.train()
    full = weights(model)
    resumed = tiny(dtype=dtype)
    tr2 = MeZOTrainer(model=resumed, args=targs(tmp_path / "b", **kw), train_dataset=ds)
    tr2.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))
    assert all(torch.equal(v, full[k]) for k, v in weights(resumed).items())
    assert tr2.mezo.log == tr.mezo.log
    # the checkpoint's optimizer state alone rebuilds the final weights from the initial ones
    state = torch.load(tmp_path / "a" / "out" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    fresh = tiny(dtype=dtype)
    replay(fresh.named_parameters(), state)
    assert all(torch.equal(v, full[k]) for k, v in weights(fresh).items())


def test_an_hf_cosine_schedule_drives_the_lr_the_kernels_use(tmp_path):
    model = tiny()
    w0 = weights(model)
    snap = _Snap()
    tr = MeZOTrainer(model=model, args=targs(tmp_path, lr_scheduler_type="cosine", warmup_steps=2, max_steps=8),
                     train_dataset=dataset(rows(4)), callbacks=[snap], exact_restore=True)   # no in-place drift
    tr.train()
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = get_cosine_schedule_with_warmup(probe, 2, 8)
    expected = []
    for _ in range(8):
        expected.append(probe.param_groups[0]["lr"])
        probe.step(); sched.step()
    assert [r["lr"] for r in tr.mezo.log] == expected
    assert [h["learning_rate"] for h in tr.state.log_history if "loss" in h] == expected
    assert expected[0] == 0.0 and all(torch.equal(snap.at[1][k], w0[k]) for k in w0)   # lr 0: no update
    assert any(not torch.equal(snap.at[2][k], snap.at[1][k]) for k in w0)


def test_settings_that_cannot_work_fail_at_construction(tmp_path):
    ds = dataset(rows(2))
    cases = [("deepspeed", {"zero_optimization": {"stage": 2}}, "DeepSpeed"), ("fp16", True, "GradScaler"),
             ("fsdp", ["full_shard"], "FSDP")]
    for field, value, msg in cases:
        args = targs(tmp_path)
        setattr(args, field, value)
        with pytest.raises(ValueError, match=msg):
            MeZOTrainer(model=tiny(), args=args, train_dataset=ds)
    model = tiny()
    with pytest.raises(ValueError, match="optimizers="):
        MeZOTrainer(model=model, args=targs(tmp_path), train_dataset=ds,
                    optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    frozen = tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        MeZOTrainer(model=frozen, args=targs(tmp_path), train_dataset=ds)
    for kw, msg in [(dict(eps=0.0), "eps"), (dict(n_directions=0), "n_directions")]:
        with pytest.raises(ValueError, match=msg):
            MeZOTrainer(model=tiny(), args=targs(tmp_path), train_dataset=ds, **kw)


def test_non_finite_losses_are_logged_as_skipped(tmp_path):
    class NaNLoss(MeZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return torch.tensor(math.nan)
    model = tiny()
    w0 = weights(model)
    tr = NaNLoss(model=model, args=targs(tmp_path, max_steps=2, logging_steps=2), train_dataset=dataset(rows(4)),
                 exact_restore=True)
    tr.train()
    log = next(h for h in tr.state.log_history if "skipped" in h)
    assert log["skipped"] == 2 and all(torch.equal(v, w0[k]) for k, v in weights(model).items())


def test_lora_model_trains_only_its_adapters(tmp_path):
    pytest.importorskip("peft")
    from mezo_kernels.models import add_lora
    model = add_lora(tiny(), r=4)
    w0 = weights(model)
    tr = MeZOTrainer(model=model, args=targs(tmp_path, max_steps=3, weight_decay=0.1), train_dataset=dataset(rows(4)))
    tr.train()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(n for g in tr.mezo.param_groups for n in g["param_names"]) == sorted(trained)
    after = weights(model)
    assert all(torch.equal(after[n], w0[n]) for n in w0 if n not in trained)
    assert any(not torch.equal(after[n], w0[n]) for n in trained if "lora_B" in n)   # B starts at 0


@pytest.mark.parametrize("perturb,distribution", [("virtual", "gaussian"), (None, "rademacher")])
def test_bf16_weights_take_the_modes_a_plain_mezo_gets_with_model(tmp_path, perturb, distribution):
    # the Trainer hands its model to MeZO, so perturb="virtual" (no masters) works through it, lands on the bits
    # of a plain loop with model=, and the perturb/distribution switches reach the optimizer and its log
    ids = rows(1)
    model = tiny(dtype=torch.bfloat16)
    tr = MeZOTrainer(model=model, args=targs(tmp_path, per_device_train_batch_size=1), train_dataset=dataset(ids),
                     eps=1e-2, perturb=perturb, distribution=distribution)
    tr.train()
    assert tr.mezo.perturb == (perturb or "inplace")
    assert tr.mezo.distribution == distribution and tr.mezo.config().get("distribution", "gaussian") == distribution
    ref = tiny(dtype=torch.bfloat16)
    opt = MeZO(ref.named_parameters(), lr=1e-2, eps=1e-2, seed=3, model=ref, perturb=perturb,
               distribution=distribution)
    plain_loop(ref, opt, ids, steps=4)
    got = weights(model)
    assert all(torch.equal(got[k], v) for k, v in weights(ref).items())
    assert [r["g"] for r in tr.mezo.log] == [r["g"] for r in opt.log]
