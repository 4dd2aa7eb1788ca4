"""MeZO inside ``transformers.Trainer``: :class:`MeZOTrainer` (and :class:`MeZOSFTTrainer` for TRL, in ``hf_sft``).

Only two hooks of the Trainer change; its loop, scheduler, logging, evaluation, callbacks and checkpoints are its own:

* ``create_optimizer`` builds a :class:`~mezo_kernels.MeZO` from ``TrainingArguments`` (``learning_rate``,
  ``weight_decay`` with HF's no-decay names); ``lr_scheduler_type`` then drives its param groups as usual.
* ``training_step`` keeps the micro-batches of a gradient-accumulation cycle and, on the cycle's last one, runs one
  MeZO step whose loss is the cycle's loss (every micro-batch at the same z): one update per cycle. The forwards run
  under ``torch.no_grad()`` with dropout off (the two passes of a step must see the same function). The Trainer's
  own ``optimizer.step()`` afterwards is a no-op; with no gradients, its clipping and ``zero_grad`` do nothing.

Checkpoints carry the optimizer's state dict (replay log, config, fp32 masters), so a resumed run ends bit-identical
to an uninterrupted one. Logs gain ``projected_grad`` (mean g since the last log), ``zero_grad_rate`` and ``skipped``
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

import math
from collections.abc import Mapping

import torch

try:
    import transformers
    from accelerate.utils import send_to_device
except ImportError as e:   # without the hf extra: say which extra to install
    from .._extras import import_error_message
    raise ImportError(import_error_message(e, "mezo_kernels.hf")) from None

from ..optim import MeZO, StepResult

__all__ = ["MeZOTrainer", "MeZOTrainerMixin", "TrainerMeZO", "ObjectiveModel", "collate_examples", "StepBatches"]


class TrainerMeZO(MeZO):
    """:class:`MeZO` as the Trainer holds it: ``step()`` without a closure (the Trainer's call after each cycle) does
    nothing, since the step already ran in ``training_step``; ``step(closure)`` is MeZO's step."""

    def step(self, closure=None, micro_batches: int = 1) -> StepResult | None:
        if closure is None:
            return None
        return super().step(closure, micro_batches)


def _unsupported(args) -> str | None:
    """Why ``args`` cannot train with MeZO, or None."""
    if getattr(args, "deepspeed", None):
        return ("DeepSpeed owns the optimizer step and partitions the weights (ZeRO); MeZO perturbs and updates "
                "whole local tensors in place with its own step. Drop `deepspeed=`")
    if getattr(args, "fsdp", None):
        return ("FSDP shards and flattens the weights and reduces gradients; MeZO needs each full tensor on one "
                "device and has no gradients. Drop `fsdp=`")
    if getattr(args, "fp16", False):
        return ("fp16=True makes the Trainer scale the loss with a GradScaler that expects gradients, and MeZO has "
                "none (the scaler would find no inf checks and fail). Use bf16=True, or load the model in "
                "float16 with fp16=False: MeZO updates fp16 weights itself (stochastic rounding, or fp32 masters "
                "with perturb='inplace')")
    if getattr(args, "world_size", 1) > 1:
        return ("with several processes each one would estimate its own projected gradient on its own batch and "
                "the replicas would drift apart; MeZO data parallelism exchanges the losses instead "
                "(mezo_kernels.distributed, `torchrun ... mezo-kernels train`)")
    return None


class MeZOTrainerMixin:
    """The two hooks; mix into a ``transformers.Trainer`` subclass before it (``class T(MeZOTrainerMixin, Base)``).

    Keyword args (besides the Trainer's): ``eps`` (perturbation scale), ``n_directions`` (directions per step),
    ``mezo_seed`` (default ``args.seed``), ``backend``, ``exact_restore``, ``perturb`` and ``distribution`` (see
    :class:`~mezo_kernels.MeZO`; the optimizer gets the Trainer's model as ``model=``, so bf16/fp16 weights take
    the virtual, masterless path by default)."""

    def __init__(self, *args, eps: float = 1e-3, n_directions: int = 1, mezo_seed: int | None = None,
                 backend: str = "auto", exact_restore: bool | None = None, perturb: str | None = None,
                 distribution: str = "gaussian", **kwargs):
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        why = _unsupported(train_args) if train_args is not None else None
        if why:
            raise ValueError(f"{type(self).__name__}: {why}.")
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers and optimizers[0] is not None:
            raise ValueError(f"{type(self).__name__} builds its MeZO optimizer from the TrainingArguments "
                             "(learning_rate, weight_decay) and eps/n_directions/mezo_seed; do not pass optimizers=")
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(f"{type(self).__name__}: optimizer_cls_and_kwargs replaces the MeZO optimizer; drop it")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
            raise ValueError(f"n_directions must be an int >= 1, got {n_directions!r}")
        super().__init__(*args, **kwargs)
        why = _unsupported(self.args)
        if why is None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            why = "accelerate is configured for DeepSpeed/FSDP, which own the optimizer step and shard the weights"
        if why:
            raise ValueError(f"{type(self).__name__}: {why}.")
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(f"{type(self).__name__}: no parameter of the model requires grad, so MeZO has nothing "
                             "to train (set requires_grad on the trainable ones, e.g. with peft)")
        self.mezo_kwargs = dict(eps=float(eps), n_directions=n_directions, backend=backend,
                                exact_restore=exact_restore, perturb=perturb, distribution=distribution,
                                seed=self.args.seed if mezo_seed is None else mezo_seed)
        self._mezo_cycle: list = []                  # (inputs, num_items_in_batch) of the cycle so far
        self._mezo_cycle_step = 0
        self._mezo_hist: list[StepResult] = []

    # ------------------------------------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            self.optimizer = TrainerMeZO(named, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                                         no_decay=[n for n, _ in named if n not in decay], model=opt_model,
                                         **self.mezo_kwargs)
        return self.optimizer

    @property
    def mezo(self) -> TrainerMeZO:
        """The MeZO optimizer (the Trainer may hold it wrapped by accelerate)."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, MeZO):
            opt = getattr(opt, "optimizer", None)
        if opt is None:
            raise RuntimeError("the MeZO optimizer is created when training starts (or by create_optimizer())")
        return opt

    # ------------------------------------------------------------------------------------------- the step
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if isinstance(inputs, Mapping) and len(inputs) == 0:
            raise ValueError("the batch is empty: the dataset has no column the model accepts")
        if self._mezo_cycle and self._mezo_cycle_step != self.state.global_step:
            self._mezo_cycle = []                    # left over from an interrupted cycle of an earlier train()
        self._mezo_cycle_step = self.state.global_step
        self._mezo_cycle.append((send_to_device(inputs, self.args.device), num_items_in_batch))
        if not self.accelerator.sync_gradients:      # more micro-batches of this cycle to come
            return torch.zeros((), device=self.args.device)
        cycle, self._mezo_cycle = self._mezo_cycle, []
        model.train()
        for m in model.modules():                    # dropout off below the root: both passes see one function
            if m is not model and m is not self.model:
                m.eval()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)   # the Trainer's own rule when it has none
        if scaled is None:
            scaled = self.compute_loss_func is not None or (
                self.model_accepts_loss_kwargs and all(n is not None for _, n in cycle))

        def cycle_loss() -> float:                   # the cycle's loss, summed in float64 over its micro-batches
            total = 0.0
            for batch, n in cycle:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, {**batch}, num_items_in_batch=n)   # a copy: it may pop labels
                loss = float(loss.detach().float().mean())
                total += loss if scaled else loss / len(cycle)
            return total

        with torch.no_grad():
            res = self.mezo.step(cycle_loss)
        self._mezo_hist.append(res)
        value = float("nan") if res.skipped else (res.loss_plus + res.loss_minus) / 2
        return torch.tensor(value, dtype=torch.float32, device=self.args.device)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._mezo_hist:
            h, self._mezo_hist = self._mezo_hist, []
            valid = [r for r in h if not r.skipped]
            logs["projected_grad"] = sum(r.grad for r in valid) / len(valid) if valid else float("nan")
            logs["zero_grad_rate"] = sum(r.grad == 0.0 for r in valid) / len(h)
            logs["skipped"] = len(h) - len(valid)
            logs.pop("grad_norm", None)              # the norm of gradients MeZO never computes: always 0
        super().log(logs, *args, **kwargs)


class MeZOTrainer(MeZOTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that trains with MeZO: same arguments, plus ``eps``, ``n_directions``,
    ``mezo_seed``, ``backend``, ``exact_restore``. See the module docstring for what changes."""


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
