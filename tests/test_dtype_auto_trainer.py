"""``MeZOTrainer(dtype=...)``: ``auto`` casts an fp32 model's frozen weights once and keeps LoRA fp32, an explicit
bf16 trains as a bf16-loaded model does, a low-precision model is left as loaded, bad values are clear errors."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from dtype_cases import AMX, NO_BF16, cpu  # noqa: E402,F401  (cpu: a fixture)


def _tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(dtype)


def _trainer(tmp_path, model, ids, **kw):
    datasets = pytest.importorskip("datasets")
    from transformers import TrainingArguments
    from mezo_kernels.hf import MeZOTrainer
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, learning_rate=1e-2,
                             max_steps=3, lr_scheduler_type="constant", report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True, logging_steps=1, seed=3)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    return MeZOTrainer(model=model, args=args, train_dataset=ds, eps=1e-2, **kw)


def _ids():
    return torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("t16,want", [(0.5, torch.bfloat16), (0.95, torch.float32)])
def test_trainer_auto_casts_the_frozen_weights_and_keeps_lora_fp32(cpu, tmp_path, t16, want):
    from mezo_kernels.models import add_lora
    calls = cpu(AMX, (1.0, t16))
    model = add_lora(_tiny_llama(), r=4)
    frozen0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tr = _trainer(tmp_path, model, _ids(), dtype="auto")
    assert calls == [64] and tr.mezo_hooks.dtype_choice.dtype == str(want).removeprefix("torch.")
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else want), n
        if not p.requires_grad:                                   # cast once, by round to nearest
            assert torch.equal(p, frozen0[n].to(want))
    tr.train()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.dtype == torch.float32 for p in lora_b) and any(p.abs().max() > 0 for p in lora_b)
    assert all(torch.equal(p, frozen0[n].to(want)) for n, p in model.named_parameters() if not p.requires_grad)


def test_trainer_bf16_full_parameter_equals_a_bf16_model(cpu, tmp_path):
    """dtype='bfloat16' on an fp32 model trains exactly as the same weights loaded in bf16 by transformers (which
    keeps the rotary buffers fp32, as the cast does) with a plain MeZO loop (fp32 masters in place)."""
    from transformers import LlamaForCausalLM
    from mezo_kernels import MeZO
    cpu(AMX)
    ids = _ids()
    model = _tiny_llama()
    model.save_pretrained(str(tmp_path / "fp32"))
    tr = _trainer(tmp_path, model, ids, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tr.train()
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path / "fp32"), dtype=torch.bfloat16)
    opt = MeZO(ref.named_parameters(), lr=1e-2, eps=1e-2, seed=3, model=ref)
    with torch.no_grad():
        for _ in range(3):
            opt.step(lambda: ref(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(9)).loss)
    got = dict(model.named_parameters())
    assert all(torch.equal(got[k], v) for k, v in ref.named_parameters())
    assert [r["g"] for r in tr.mezo.log] == [r["g"] for r in opt.log]


def test_trainer_auto_leaves_a_low_precision_model_as_loaded(cpu, tmp_path):
    calls = cpu(NO_BF16, (1.0, 4.0))                            # auto would pick fp32 for an fp32 model here
    model = _tiny_llama(torch.bfloat16)
    tr = _trainer(tmp_path, model, _ids(), dtype="auto")
    assert calls == [] and tr.mezo_hooks.dtype_choice.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tr2 = _trainer(tmp_path, model, _ids(), dtype="float32")   # an explicit dtype casts
    assert tr2.mezo_hooks.dtype_choice.dtype == "float32" and all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("bad,exc", [("bf16", ValueError), (torch.float32, TypeError)])
def test_trainer_bad_dtype_is_a_clear_error(tmp_path, bad, exc):
    model = _tiny_llama()
    with pytest.raises(exc, match="dtype must be"):
        _trainer(tmp_path, model, _ids(), dtype=bad)
    assert all(p.dtype == torch.float32 for p in model.parameters())
