"""MeZO supervised fine-tuning with TRL: :class:`MeZOSFTTrainer` is ``trl.SFTTrainer`` with MeZO's two hooks
(delegated to a :class:`~mezo_kernels.hf.hooks.MeZOHooks`, as ``MeZOTrainer`` does).

Everything else is TRL's: dataset preparation, the collator (for prompt/completion data ``completion_only_loss``
defaults to True, so prompt tokens get label -100 and carry no loss) and ``SFTTrainer.compute_loss``, which the
MeZO step calls for its two forwards.
"""
from __future__ import annotations

try:
    import trl
except ImportError as e:   # pragma: no cover - exercised only without the extra
    from .._extras import import_error_message
    raise ImportError(import_error_message(e, "mezo_kernels.hf.trl (MeZOSFTTrainer)")) from None

import torch

from .hooks import MeZOHooks, TrainerMeZO

__all__ = ["MeZOSFTTrainer"]


class MeZOSFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` trained by MeZO: the same arguments (``args`` an ``SFTConfig``), plus ``eps``,
    ``n_directions``, ``mezo_seed``, ``backend``, ``exact_restore``, ``perturb``, ``distribution``.

    TRL's ``num_tokens`` metric counts every forward, so it reads 2 x ``n_directions`` times the tokens seen."""

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
