"""MeZO supervised fine-tuning with TRL: :class:`MeZOSFTTrainer` is ``trl.SFTTrainer`` with MeZO's two hooks.

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

from .trainer import MeZOTrainerMixin

__all__ = ["MeZOSFTTrainer"]


class MeZOSFTTrainer(MeZOTrainerMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` trained by MeZO: the same arguments (``args`` an ``SFTConfig``), plus ``eps``,
    ``n_directions``, ``mezo_seed``, ``backend``, ``exact_restore``.

    TRL's ``num_tokens`` metric counts every forward, so it reads 2 x ``n_directions`` times the tokens seen."""
