"""MeZO inside ``transformers.Trainer``: :class:`MeZOTrainer` (and :class:`MeZOSFTTrainer` for TRL, in ``trl.py``).

Only two hooks of the Trainer change (their logic is :class:`~mezo_kernels.hf.hooks.MeZOHooks`, which both trainers
hold and delegate to); its loop, scheduler, logging, evaluation, callbacks and checkpoints are its own:

* ``create_optimizer`` builds a :class:`~mezo_kernels.MeZO` from ``TrainingArguments`` (``learning_rate``,
  ``weight_decay`` with HF's no-decay names); ``lr_scheduler_type`` then drives its param groups as usual.
* ``training_step`` keeps the micro-batches of a gradient-accumulation cycle and, on the cycle's last one, runs one
  MeZO step whose loss is the cycle's loss (every micro-batch at the same z): one update per cycle. The forwards run
  under ``torch.no_grad()`` with dropout off (the two passes of a step must see the same function). The Trainer's
  own ``optimizer.step()`` afterwards is a no-op; with no gradients, its clipping and ``zero_grad`` do nothing.

Checkpoints carry the optimizer's state dict (replay log, config, fp32 masters), so a resumed run ends bit-identical
to an uninterrupted one. Under ``torchrun`` / ``accelerate launch`` the ranks train data-parallel without a DDP
wrapper: MeZO averages the losses over the ranks, so all take the same step (``docs/hf.md``, "Several processes"). Logs gain ``projected_grad`` (mean g since the last log), ``zero_grad_rate`` and ``skipped``
(steps whose losses were not finite, weights unchanged).

Prompt objectives (``objectives.CausalLMObjective`` / ``MaskedLMObjective``, called on batches of
:class:`~mezo_kernels.tasks.records.Example`) plug in without touching ``compute_loss``: wrap the model in
:class:`ObjectiveModel` (its forward takes ``examples=`` and returns ``{"loss", "logits"}``, which the Trainer's
own ``compute_loss`` reads) and pass ``data_collator=collate_examples``; a list of Examples is then a train
dataset. :class:`StepBatches` lays out the CLI trainer's batches (``trainer.batch_for``) in its order, so a
``MeZOTrainer`` run with ``train_sampling_strategy="sequential"`` sees the same data as ``mezo-kernels train``
with the same seed (the same weights, bit for bit, on the same backend)::

    trainer = MeZOTrainer(model=ObjectiveModel(peft_model, objective), args=args, data_collator=collate_examples,
                          train_dataset=StepBatches(splits.train, seed=0, batch_size=16, steps=100), eps=1e-2)
"""
from __future__ import annotations

import torch

try:
    import transformers
except ImportError as e:   # without the hf extra: say which extra to install
    from .._extras import import_error_message
    raise ImportError(import_error_message(e, "mezo_kernels.hf")) from None

from .hooks import MeZOHooks, TrainerMeZO

__all__ = ["MeZOTrainer", "MeZOHooks", "TrainerMeZO", "ObjectiveModel", "collate_examples", "StepBatches"]


class MeZOTrainer(transformers.Trainer):
    """``transformers.Trainer`` that trains with MeZO: same arguments, plus ``eps``, ``n_directions``,
    ``mezo_seed``, ``backend``, ``exact_restore``, ``perturb``, ``distribution``, ``dtype`` (:class:`MeZOHooks`;
    ``dtype="auto"`` casts the model to bf16 where that is faster, LoRA adapters kept fp32). See the
    module docstring for what changes; the MeZO logic lives in ``self.mezo_hooks``, each override delegates."""

    def __init__(self, *args, **kwargs):
        self.mezo_hooks = MeZOHooks.take(type(self).__name__, args, kwargs)
        super().__init__(*args, **kwargs)
        self.mezo_hooks.attach(self)

    def create_optimizer(self, model=None):
        return self.mezo_hooks.create_optimizer(self, model)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        return self.mezo_hooks.training_step(self, model, inputs, num_items_in_batch)

    def log(self, logs: dict, *args, **kwargs) -> None:
        self.mezo_hooks.annotate(logs)
        super().log(logs, *args, **kwargs)

    @property
    def mezo(self) -> TrainerMeZO:
        """The MeZO optimizer (the Trainer may hold it wrapped by accelerate)."""
        return MeZOHooks.optimizer_of(self)


class ObjectiveModel(torch.nn.Module):
    """``model`` scored by a prompt ``objective``, as a module the Trainer can call: ``forward(examples)`` with
    ``examples`` a list of B :class:`~mezo_kernels.tasks.records.Example` returns ``{"loss": scalar float32,
    "logits": [B, C] float32 class scores}`` from ``objective(model, examples)``. ``model`` (e.g. the peft model)
    is a submodule, so the Trainer trains its parameters; save it, not the wrapper, with ``save_pretrained``."""

    def __init__(self, model: torch.nn.Module, objective) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(objective):
            raise TypeError(f"objective must be callable as objective(model, examples), got {objective!r}")
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, examples) -> dict:
        out = self.objective(self.model, examples)
        return {"loss": out.loss, "logits": out.logits}


def collate_examples(features) -> dict:
    """The Trainer's batch of :class:`ObjectiveModel`: ``{"examples": list(features)}`` (no tokenizing: the
    objective encodes its batch itself)."""
    return {"examples": list(features)}


class StepBatches(torch.utils.data.Dataset):
    """The examples of ``trainer.batch_for(train, step, seed, batch_size)`` for ``step = 0 .. steps-1``, one
    after the other (``steps * batch_size`` items): with ``per_device_train_batch_size=batch_size``,
    ``max_steps=steps`` and ``train_sampling_strategy="sequential"`` the Trainer's step t gets the CLI trainer's
    batch t. Needs ``len(train) >= batch_size`` (else the CLI's batches are smaller than the Trainer's)."""

    def __init__(self, train, seed: int, batch_size: int, steps: int) -> None:
        for name, v in (("batch_size", batch_size), ("steps", steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if len(train) < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {len(train)} training examples: "
                             "the CLI would draw smaller batches, which a fixed Trainer batch size cannot follow")
        from ..train.loop import batch_for
        self.items = [e for step in range(steps) for e in batch_for(list(train), step, seed, batch_size)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]
