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
import torch.distributed as dist

try:
    from accelerate.utils import send_to_device
except ImportError as e:   # without the hf extra: say which extra to install
    from .._extras import import_error_message
    raise ImportError(import_error_message(e, "mezo_kernels.hf")) from None

from .. import _compat
from ..optim import MeZO, StepResult
from ..optim.distributed import fsdp_modules
from ..train import dtype as dtypes

__all__ = ["MeZOHooks", "TrainerMeZO"]


class TrainerMeZO(MeZO):
    """:class:`MeZO` as the Trainer holds it: ``step()`` without a closure (the Trainer's call after each cycle) does
    nothing, since the step already ran in ``training_step``; ``step(closure)`` is MeZO's step."""

    def step(self, closure=None, micro_batches: int = 1) -> StepResult | None:
        if closure is None:
            return None
        return super().step(closure, micro_batches)


def _fsdp_version(args) -> int | None:
    """The FSDP version ``args`` asks accelerate for, None without ``fsdp=``; 0 when ``fsdp_config`` does not say
    (MeZO takes FSDP2 only, and asks for it explicitly rather than rely on the Trainer's default)."""
    if not getattr(args, "fsdp", None):
        return None
    cfg = getattr(args, "fsdp_config", None) or {}
    return int(cfg.get("version", cfg.get("fsdp_version", 0)))


def _unsupported(args) -> str | None:
    """Why ``args`` cannot train with MeZO, or None."""
    if getattr(args, "deepspeed", None):
        return ("DeepSpeed owns the optimizer step and partitions the weights into its own flat buffers (ZeRO), "
                "which MeZO can neither see nor perturb in place: its engine wraps a gradient optimizer, and MeZO "
                "has no gradients. Drop `deepspeed=`; for sharded weights use FSDP2 (`fully_shard`, or fsdp= with "
                "fsdp_config={'version': 2})")
    if _fsdp_version(args) not in (None, 2):
        return ("FSDP1 flattens the weights into FlatParameters and reduces gradients; MeZO works on FSDP2's "
                "per-parameter DTensor shards. Pass fsdp_config={'version': 2} (explicitly), or apply `fully_shard` "
                "to the model yourself and drop fsdp=")
    if getattr(args, "fp16", False):
        return ("fp16=True makes the Trainer scale the loss with a GradScaler that expects gradients, and MeZO has "
                "none (the scaler would find no inf checks and fail). Use bf16=True, or load the model in "
                "float16 with fp16=False: MeZO updates fp16 weights itself (stochastic rounding, or fp32 masters "
                "with perturb='inplace')")
    return None


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _skip_ddp(accelerator) -> None:
    """Make ``accelerator`` prepare models without the DDP wrapper (its ``evaluation_mode``: device placement,
    autocast and compile only). MeZO never calls backward, so DDP would only cost gradient buckets as large as the
    trainable weights and a buffer broadcast per forward (and it refuses FSDP2's DTensor parameters); the ranks stay
    in step through MeZO's loss all-reduce instead."""
    if getattr(accelerator, "_mezo_no_ddp", False):
        return
    prepare_model = accelerator.prepare_model

    def no_ddp(model, device_placement=None, evaluation_mode=False):
        return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

    accelerator.prepare_model = no_ddp
    accelerator._mezo_no_ddp = True


def _broadcast_plain(model: torch.nn.Module) -> None:
    """Copy rank 0's plain (non-DTensor) parameters and buffers to every rank, as DDP's constructor does, so the
    replicas start equal (e.g. a LoRA adapter initialised without a common seed). DTensor shards are the sharding
    owner's business."""
    from torch.distributed.tensor import DTensor
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if not isinstance(t, DTensor) and not isinstance(getattr(t, "data", None), DTensor):
                dist.broadcast(t.data, src=0)


class MeZOHooks:
    """The MeZO step logic of one trainer. Build it with :meth:`take` from the trainer's constructor arguments
    (before ``Trainer.__init__``), then call :meth:`attach` once the Trainer is built.

    Keyword args: ``eps`` (perturbation scale), ``n_directions`` (directions per step), ``mezo_seed`` (default
    ``args.seed``), ``backend``, ``exact_restore``, ``perturb``, ``distribution``, ``lowrank_r`` and ``lowrank_lazy``
    (see :class:`~mezo_kernels.MeZO`;
    the optimizer gets the Trainer's model as ``model=``, so bf16/fp16 weights take the virtual, masterless path by
    default); ``dtype``: the compute dtype the model is cast to when the trainer is built (``auto`` | ``float32`` |
    ``bfloat16`` | ``float16``; LoRA adapters stay fp32; ``mezo_kernels.train.dtype.cast_model``; None: as loaded;
    default ``dtype.TRAINER_DEFAULT``), what it chose in ``dtype_choice``."""

    KEYS = ("eps", "n_directions", "mezo_seed", "backend", "exact_restore", "perturb", "distribution", "lowrank_r",
            "lowrank_lazy", "dtype")

    def __init__(self, owner: str, eps: float = 1e-3, n_directions: int = 1, mezo_seed: int | None = None,
                 backend: str = "auto", exact_restore: bool | None = None, perturb: str | None = None,
                 distribution: str = "gaussian", lowrank_r: int | None = None,
                 lowrank_lazy: int | None = None, dtype: str | None = dtypes.TRAINER_DEFAULT) -> None:
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
            raise ValueError(f"n_directions must be an int >= 1, got {n_directions!r}")
        self.dtype = None if dtype is None else dtypes.check_dtype(dtype)
        self.dtype_choice: dtypes.DtypeChoice | None = None
        self.owner, self.mezo_seed = owner, mezo_seed
        self.settings: dict[str, Any] = dict(eps=float(eps), n_directions=n_directions, backend=backend,
                                             exact_restore=exact_restore, perturb=perturb, distribution=distribution,
                                             lowrank_r=lowrank_r, lowrank_lazy=lowrank_lazy)
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
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        if why is None and trainer.is_deepspeed_enabled:
            why = "accelerate is configured for DeepSpeed, which owns the optimizer step and partitions the weights"
        elif why is None and plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
            why = "accelerate is configured for FSDP1, which flattens the weights; MeZO needs FSDP2 (fsdp_version 2)"
        if why:
            raise ValueError(f"{self.owner}: {why}.")
        save = getattr(trainer.args.save_strategy, "value", trainer.args.save_strategy)
        if plugin is None and save != "no" and _compat.fsdp_modules(trainer.model):
            raise ValueError(f"{self.owner}: the Trainer's checkpoints cannot hold a model you wrapped with "
                             "`fully_shard` yourself: it writes the weights from rank 0 alone, while gathering the "
                             "DTensor shards takes every rank (the run would hang or abort at the first save). Pass "
                             "save_strategy='no' and save with torch.distributed.checkpoint (or full_tensor() on "
                             "every rank) yourself, or let accelerate apply FSDP2 (fsdp=, fsdp_config={'version': 2})")
        if trainer.accelerator.num_processes > 1 and plugin is None:
            _skip_ddp(trainer.accelerator)           # data parallel through MeZO's loss all-reduce, not DDP
        if not any(p.requires_grad for p in trainer.model.parameters()):
            raise ValueError(f"{self.owner}: no parameter of the model requires grad, so MeZO has nothing to train "
                             "(set requires_grad on the trainable ones, e.g. with peft)")
        self.settings["seed"] = trainer.args.seed if self.mezo_seed is None else self.mezo_seed
        if self.dtype is not None:                   # before the optimizer is built on the parameters
            self.dtype_choice = dtypes.cast_model(trainer.model, self.dtype, trainer.args.device)

    # ------------------------------------------------------------------------------------------- optimizer
    def create_optimizer(self, trainer, model=None):
        """``Trainer.create_optimizer``: a :class:`TrainerMeZO` from the TrainingArguments (``learning_rate``,
        ``weight_decay`` with HF's no-decay names), made once."""
        if trainer.optimizer is None:
            opt_model = trainer.model if model is None else model
            if _world() > 1:
                _broadcast_plain(opt_model)
            trainer.optimizer = self._build(trainer, opt_model)
        return trainer.optimizer

    def _build(self, trainer, opt_model) -> TrainerMeZO:
        fsdp_modules(opt_model, "inplace")            # FSDP2: read the registered (sharded) parameters
        decay = set(trainer.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        self.built = [p for _, p in named]
        return TrainerMeZO(named, lr=trainer.args.learning_rate, weight_decay=trainer.args.weight_decay,
                           no_decay=[n for n, _ in named if n not in decay], model=opt_model, **self.settings)

    def check_params(self, trainer) -> None:
        """Once per optimizer and ``train()`` call, at its first training step: are the tensors it was built on still the model's
        parameters? Accelerate's FSDP2 (``fsdp=`` with version 2) shards the model after ``create_optimizer`` and
        replaces every parameter by a new DTensor: MeZO, which holds the old tensors, is then rebuilt on the new
        ones before its first step; after a step (a resumed run) that cannot be done, and it is an error."""
        opt = self.optimizer_of(trainer)
        checked = getattr(self, "checked", None)
        if checked is not None and checked[0] is opt and checked[1] is trainer.state:
            return
        fsdp_modules(trainer.model, "inplace")
        live = {id(p) for p in trainer.model.parameters()}
        lost = [p for p in getattr(self, "built", []) if id(p) not in live]
        if lost:
            if opt.step_count > 0:
                raise RuntimeError(
                    f"{self.owner}: {len(lost)} of the {len(self.built)} tensors the MeZO optimizer was built on are "
                    "no longer parameters of the model: something (accelerate's FSDP2 preparation, fsdp=...) "
                    "replaced them after the optimizer was built and after it had stepped or loaded a checkpoint, "
                    "so MeZO would perturb and update tensors the forward never reads. Apply `fully_shard` to the "
                    "model yourself before building the trainer (and drop fsdp=)")
            new = self._build(trainer, trainer.model)
            for g_new, g_old in zip(new.param_groups, opt.param_groups):
                g_new.update({k: v for k, v in g_old.items() if k not in ("params", "param_names")})
            holder = trainer
            while holder.optimizer is not opt:
                holder = holder.optimizer
            holder.optimizer = new
            opt = new
        self.checked = (opt, trainer.state)

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
        self.check_params(trainer)
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
