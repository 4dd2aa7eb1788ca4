"""MeZOTrainer with a prompt objective (ObjectiveModel + collate_examples + StepBatches) on tiny-llama: the same
bits as the CLI trainer's loop on the same batches, and clear errors for bad input."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from mezo_kernels.tasks import data  # noqa: E402
from mezo_kernels.train import loop as trainer  # noqa: E402
from mezo_kernels.train.config import TrainConfig  # noqa: E402
from mezo_kernels.tasks.records import Example  # noqa: E402
from mezo_kernels.hf import MeZOTrainer, ObjectiveModel, StepBatches, collate_examples  # noqa: E402

STEPS, BATCH = 4, 4


def cfg_for(data_dir, out):
    return TrainConfig(model="tiny-llama", data_dir=data_dir, output_dir=str(out), k=8, batch_size=BATCH,
                       steps=STEPS, lr=5e-3, eps=1e-2, seed=1, eval_every=0, max_minutes=None, eval_max=8)


def hf_run(cfg, out):
    """A MeZOTrainer run with the settings of ``cfg``: (peft model, trainer)."""
    splits = data.load_task_splits(cfg.task, cfg.data_dir, cfg.protocol, cfg.k, cfg.seed)
    model, _, _, obj, _ = trainer.build(cfg)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=cfg.batch_size, max_steps=cfg.steps,
                             learning_rate=cfg.lr, lr_scheduler_type="constant", weight_decay=cfg.weight_decay,
                             seed=cfg.seed, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                             logging_steps=1, train_sampling_strategy="sequential")
    tr = MeZOTrainer(model=ObjectiveModel(model, obj), args=args, data_collator=collate_examples,
                     train_dataset=StepBatches(splits.train, cfg.seed, cfg.batch_size, cfg.steps), eps=cfg.eps)
    tr.train()
    return model, tr


def test_trainer_with_the_prompt_objective_lands_on_the_cli_bits(data_dir, tmp_path):
    cfg = cfg_for(data_dir, tmp_path / "cli")
    trainer.train(cfg, progress=False)
    model, tr = hf_run(cfg_for(data_dir, tmp_path / "cli"), tmp_path / "hf")
    model.save_pretrained(str(tmp_path / "hf_adapter"))
    cli = load_file(str(tmp_path / "cli" / "adapter" / "adapter_model.safetensors"))
    hf = load_file(str(tmp_path / "hf_adapter" / "adapter_model.safetensors"))
    assert cli.keys() == hf.keys() and len(cli) > 0
    assert all(torch.equal(cli[k], hf[k]) for k in cli)
    assert any(v.abs().max() > 0 for k, v in hf.items() if "lora_B" in k)     # B starts at 0: it trained
    # step by step: the Trainer's step t saw the CLI's batch t at the same z (same projected gradient)
    g_cli = [json.loads(x)["g"] for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    g_hf = [h["projected_grad"] for h in tr.state.log_history if "projected_grad" in h]
    assert len(g_cli) == STEPS and g_hf == g_cli
    # and the reported evaluation of the trained weights agrees
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    splits = data.load_task_splits(cfg.task, cfg.data_dir, cfg.protocol, cfg.k, cfg.seed)
    final = data.subsample(splits.test, cfg.eval_max, cfg.seed)
    assert trainer.evaluate(model, tr.model.objective, final)["loss"] == summary["after"]["loss"]


def test_step_batches_are_the_cli_batches_in_order():
    train = [Example(f"s{i}", None, i % 2) for i in range(10)]
    items = list(StepBatches(train, seed=5, batch_size=3, steps=4))
    assert items == [e for s in range(4) for e in trainer.batch_for(train, s, 5, 3)]
    assert collate_examples(items[:3]) == {"examples": items[:3]}


def test_bad_input_is_refused_by_name():
    train = [Example("a", None, 0), Example("b", None, 1)]
    with pytest.raises(ValueError, match="batch_size=3 is larger than the 2 training examples"):
        StepBatches(train, seed=0, batch_size=3, steps=1)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        StepBatches(train, seed=0, batch_size=1, steps=0)
    with pytest.raises(TypeError, match="objective must be callable"):
        ObjectiveModel(torch.nn.Linear(2, 2), objective=None)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ObjectiveModel("model", objective=lambda m, b: None)
