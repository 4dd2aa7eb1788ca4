"""The three usage examples (plain PyTorch loop, transformers.Trainer, TRL SFT), run as written on a tiny random
model ("smollm2-135m" in the docs). Each test body between the marker comments is the example's text."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _moved(model, before):
    return any(not torch.equal(p.detach().cpu(), before[n].cpu()) for n, p in model.named_parameters())


def test_plain_pytorch_loop():
    # --- example: MeZO in a plain PyTorch loop
    import torch
    from mezo_kernels import MeZO
    from mezo_kernels.models import load_model

    model, tok, _ = load_model("tiny-llama")              # any nn.Module: "smollm2-135m", a hub id, a folder
    batch = tok(["MeZO trains a language model with forward passes only."], return_tensors="pt")
    opt = MeZO(model.named_parameters(), lr=1e-4, eps=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    for step in range(20):
        with torch.no_grad():                             # no autograd graph: two forwards per step
            res = opt.step(lambda: model(**batch, labels=batch["input_ids"]).loss)
        sched.step()
    # --- end
    before = _snapshot(load_model("tiny-llama")[0])
    assert _moved(model, before) and opt.step_count == 20 and not res.skipped
    assert [r["lr"] for r in opt.log][-1] < 1e-4             # the scheduler drove the kernels' lr


def test_transformers_trainer(tmp_path):
    out = str(tmp_path / "run")
    # --- example: MeZO with transformers.Trainer
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, TrainingArguments
    from mezo_kernels.hf import MeZOTrainer
    from mezo_kernels.models import load_model

    model, tok, _ = load_model("tiny-llama")
    tok.pad_token = tok.eos_token
    texts = ["the movie was great", "what a terrible film", "I liked it a lot", "boring and slow"] * 4
    ds = Dataset.from_dict({"text": texts}).map(lambda e: tok(e["text"]), remove_columns=["text"])
    args = TrainingArguments(output_dir=out, max_steps=10, per_device_train_batch_size=4, learning_rate=1e-4,
                             lr_scheduler_type="cosine", weight_decay=0.01, gradient_accumulation_steps=2,
                             logging_steps=5, save_steps=5, report_to="none")
    trainer = MeZOTrainer(model=model, args=args, train_dataset=ds, eps=1e-3,
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()                                      # trainer.train(resume_from_checkpoint=True) resumes
    # --- end
    before = _snapshot(load_model("tiny-llama")[0])
    assert _moved(model, before) and trainer.state.global_step == 10
    assert all("projected_grad" in h for h in trainer.state.log_history if "loss" in h)


def test_trl_sft(tmp_path):
    pytest.importorskip("trl")
    out = str(tmp_path / "sft")
    # --- example: MeZO SFT with TRL (loss on the completion tokens only)
    import torch
    from datasets import Dataset
    from trl import SFTConfig
    from mezo_kernels.hf import MeZOSFTTrainer
    from mezo_kernels.models import load_model

    model, tok, _ = load_model("tiny-llama")
    ds = Dataset.from_dict({"prompt": ["Review: the movie was great. Sentiment:", "Review: boring. Sentiment:"] * 4,
                            "completion": [" positive", " negative"] * 4})
    args = SFTConfig(output_dir=out, max_steps=10, per_device_train_batch_size=4, learning_rate=1e-4,
                     logging_steps=5, report_to="none", use_cpu=not torch.cuda.is_available())
    trainer = MeZOSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, eps=1e-3)
    trainer.train()
    # --- end
    before = _snapshot(load_model("tiny-llama")[0])
    assert _moved(model, before) and len(trainer.mezo.log) == 10
