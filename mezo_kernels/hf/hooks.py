"""MeZO's side of a ``transformers.Trainer``, as an object the trainer holds (composition, not a mixin).

:class:`MeZOHooks` owns the MeZO settings, the micro-batches of the current gradient-accumulation cycle and the
step results since the last log. The trainer classes (``MeZOTrainer``, ``MeZOSFTTrainer``) keep it in
``self.mezo_hooks`` and define their overrides (``__init__``, ``create_optimizer``, ``training_step``, ``log``,
``mezo``) as one-line delegations; the hooks read only the Trainer's public API of the trainer handed to them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

try:
    from accelerate.utils import send_to_device
except ImportError as e:   # without the hf extra: say which extra to install
    from .._extras import import_error_message
    raise ImportError(import_error_message(e, "mezo_kernels.hf")) from None

from ..optim import MeZO, StepResult

__all__ = ["MeZOHooks", "TrainerMeZO"]


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


class MeZOHooks:
    """The MeZO step logic of one trainer. Build it with :meth:`take` from the trainer's constructor arguments
    (before ``Trainer.__init__``), then call :meth:`attach` once the Trainer is built.

    Keyword args: ``eps`` (perturbation scale), ``n_directions`` (directions per step), ``mezo_seed`` (default
    ``args.seed``), ``backend``, ``exact_restore``, ``perturb`` and ``distribution`` (see :class:`~mezo_kernels.MeZO`;
    the optimizer gets the Trainer's model as ``model=``, so bf16/fp16 weights take the virtual, masterless path by
    default)."""

    KEYS = ("eps", "n_directions", "mezo_seed", "backend", "exact_restore", "perturb", "distribution")

    def __init__(self, owner: str, eps: float = 1e-3, n_directions: int = 1, mezo_seed: int | None = None,
                 backend: str = "auto", exact_restore: bool | None = None, perturb: str | None = None,
                 distribution: str = "gaussian") -> None:
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
            raise ValueError(f"n_directions must be an int >= 1, got {n_directions!r}")
        self.owner, self.mezo_seed = owner, mezo_seed
        self.settings: dict[str, Any] = dict(eps=float(eps), n_directions=n_directions, backend=backend,
                                             exact_restore=exact_restore, perturb=perturb, distribution=distribution)
        self.cycle: list = []                   # (inputs, num_items_in_batch) of the cycle so far
        self.cycle_step = 0
        self.history: list[StepResult] = []     # step results since the last log

    @classmethod
    def take(cls, owner: str, args: tuple, kwargs: dict) -> "MeZOHooks":
        """The hooks of a trainer called ``owner`` constructed with ``(*args, **kwargs)``: MeZO's keywords are
        popped from ``kwargs`` (the rest go to the Trainer); ValueError for what cannot train with MeZO."""
        mine = {k: kwargs.pop(k) for k in cls.KEYS if k in kwargs}
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        why = _unsupported(train_args) if train_args is not None else None
        if why:
            raise ValueError(f"{owner}: {why}.")
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers and optimizers[0] is not None:
            raise ValueError(f"{owner} builds its MeZO optimizer from the TrainingArguments "
                             "(learning_rate, weight_decay) and eps/n_directions/mezo_seed; do not pass optimizers=")
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(f"{owner}: optimizer_cls_and_kwargs replaces the MeZO optimizer; drop it")
        return cls(owner, **mine)

    def attach(self, trainer) -> None:
        """Check the built ``trainer`` (its final args, accelerate's plugins, something to train) and take its
        seed when no ``mezo_seed`` was given."""
        why = _unsupported(trainer.args)
        if why is None and (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
            why = "accelerate is configured for DeepSpeed/FSDP, which own the optimizer step and shard the weights"
        if why:
            raise ValueError(f"{self.owner}: {why}.")
        if not any(p.requires_grad for p in trainer.model.parameters()):
            raise ValueError(f"{self.owner}: no parameter of the model requires grad, so MeZO has nothing to train "
                             "(set requires_grad on the trainable ones, e.g. with peft)")
        self.settings["seed"] = trainer.args.seed if self.mezo_seed is None else self.mezo_seed

    # ------------------------------------------------------------------------------------------- optimizer
    def create_optimizer(self, trainer, model=None):
        """``Trainer.create_optimizer``: a :class:`TrainerMeZO` from the TrainingArguments (``learning_rate``,
        ``weight_decay`` with HF's no-decay names), made once."""
        if trainer.optimizer is None:
            opt_model = trainer.model if model is None else model
            decay = set(trainer.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            trainer.optimizer = TrainerMeZO(named, lr=trainer.args.learning_rate,
                                            weight_decay=trainer.args.weight_decay,
                                            no_decay=[n for n, _ in named if n not in decay], model=opt_model,
                                            **self.settings)
        return trainer.optimizer

    @staticmethod
    def optimizer_of(trainer) -> TrainerMeZO:
        """The MeZO optimizer of ``trainer`` (the Trainer may hold it wrapped by accelerate)."""
        opt = trainer.optimizer
        while opt is not None and not isinstance(opt, MeZO):
            opt = getattr(opt, "optimizer", None)
        if opt is None:
            raise RuntimeError("the MeZO optimizer is created when training starts (or by create_optimizer())")
        return opt

    # ------------------------------------------------------------------------------------------- the step
    def training_step(self, trainer, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """``Trainer.training_step``: keep the cycle's micro-batches; on its last one, one MeZO step whose loss is
        the cycle's (every micro-batch at the same z). Returns the step's mean loss (NaN when skipped)."""
        device = trainer.args.device
        if isinstance(inputs, Mapping) and len(inputs) == 0:
            raise ValueError("the batch is empty: the dataset has no column the model accepts")
        if self.cycle and self.cycle_step != trainer.state.global_step:
            self.cycle = []                          # left over from an interrupted cycle of an earlier train()
        self.cycle_step = trainer.state.global_step
        self.cycle.append((send_to_device(inputs, device), num_items_in_batch))
        if not trainer.accelerator.sync_gradients:   # more micro-batches of this cycle to come
            return torch.zeros((), device=device)
        cycle, self.cycle = self.cycle, []
        model.train()
        for m in model.modules():                    # dropout off below the root: both passes see one function
            if m is not model and m is not trainer.model:
                m.eval()
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)   # the Trainer's own rule when it has none
        if scaled is None:
            scaled = trainer.compute_loss_func is not None or (
                trainer.model_accepts_loss_kwargs and all(n is not None for _, n in cycle))

        def cycle_loss() -> float:                   # the cycle's loss, summed in float64 over its micro-batches
            total = 0.0
            for batch, n in cycle:
                with trainer.compute_loss_context_manager():
                    loss = trainer.compute_loss(model, {**batch}, num_items_in_batch=n)   # a copy: it may pop labels
                loss = float(loss.detach().float().mean())
                total += loss if scaled else loss / len(cycle)
            return total

        with torch.no_grad():
            res = self.optimizer_of(trainer).step(cycle_loss)
        self.history.append(res)
        value = float("nan") if res.skipped else (res.loss_plus + res.loss_minus) / 2
        return torch.tensor(value, dtype=torch.float32, device=device)

    def annotate(self, logs: dict) -> None:
        """``Trainer.log``: a training-loss record gains ``projected_grad`` (mean g since the last log),
        ``zero_grad_rate`` and ``skipped``, and loses ``grad_norm`` (of gradients MeZO never computes)."""
        if "loss" in logs and self.history:
            h, self.history = self.history, []
            valid = [r for r in h if not r.skipped]
            logs["projected_grad"] = sum(r.grad for r in valid) / len(valid) if valid else float("nan")
            logs["zero_grad_rate"] = sum(r.grad == 0.0 for r in valid) / len(h)
            logs["skipped"] = len(h) - len(valid)
            logs.pop("grad_norm", None)
