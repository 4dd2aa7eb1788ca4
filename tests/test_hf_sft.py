"""MeZOSFTTrainer (TRL) on prompt/completion data: prompt tokens carry no loss, and the MeZO steps optimize exactly
the cross-entropy over completion tokens."""
import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import SFTConfig  # noqa: E402

from mezo_kernels import MeZO, models  # noqa: E402
from mezo_kernels.hf import MeZOSFTTrainer  # noqa: E402

PROMPTS = ["The movie was", "I think it is a"]
COMPLETIONS = [" great", " terrible movie"]


def sft(tmp_path, model, tok, **kw):
    base = dict(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                logging_steps=1, seed=1, dataset_num_proc=None)
    return MeZOSFTTrainer(model=model, args=SFTConfig(**{**base, **kw}), processing_class=tok, eps=5e-2,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS, "completion": COMPLETIONS}))


def completion_ce(model, batch, completion_only=True):
    """Mean next-token cross-entropy over the completion tokens (or over every real token)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["input_ids"][:, 1:]
    keep = (batch["labels"][:, 1:] != -100) if completion_only else batch["attention_mask"][:, 1:].bool()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return ce[keep].sum() / keep.sum()


def test_prompt_tokens_carry_no_loss(tmp_path):
    model, tok, _ = models.load_model("tiny-llama", seed=0)
    tr = sft(tmp_path, model, tok)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(2)])
    for row, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        n_prompt = len(tok(p)["input_ids"])
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        assert (labels[:n_prompt] == -100).all()                          # the prompt: no targets
        real = batch["attention_mask"][row].bool()
        assert torch.equal(labels[n_prompt:][real[n_prompt:]], ids[n_prompt:][real[n_prompt:]])   # completion + eos
        assert (labels[~real] == -100).all()
    with torch.no_grad():
        loss = tr.compute_loss(model, dict(batch))
        assert float(loss) == pytest.approx(float(completion_ce(model, batch)), rel=1e-5)
        assert abs(float(loss) - float(completion_ce(model, batch, completion_only=False))) > 1e-3


def test_mezo_sft_steps_equal_a_plain_loop_on_completion_ce(tmp_path):
    model, tok, _ = models.load_model("tiny-llama", seed=0)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = sft(tmp_path, model, tok, bf16=False)       # SFTConfig defaults to bf16 autocast; compare in fp32
    batch = tr.data_collator([tr.train_dataset[i] for i in range(2)])   # every step's batch (bs = dataset size)
    tr.train()
    ref, _, _ = models.load_model("tiny-llama", seed=0)
    opt = MeZO(ref.named_parameters(), lr=1e-2, eps=5e-2, seed=1)
    with torch.no_grad():
        for _ in range(4):
            opt.step(lambda: completion_ce(ref, batch))
    assert [r["g"] for r in tr.mezo.log] == pytest.approx([r["g"] for r in opt.log], rel=1e-4, abs=1e-5)
    got = dict(model.named_parameters())
    assert all(torch.allclose(got[n].detach(), p.detach(), rtol=0, atol=1e-6) for n, p in ref.named_parameters())
    assert any(not torch.equal(got[n].detach(), w0[n]) for n in w0)
    assert {"projected_grad", "mean_token_accuracy"} <= tr.state.log_history[0].keys()
