"""Prefix tuning (MeZO-prefix): P learned key/value vectors per attention layer that every token of every row
attends to before its own, the only trainable tensor. Causal LMs go through peft's ``PrefixTuningConfig``
(causal.py); masked LMs, whose forward takes no KV cache, through :class:`PrefixMaskedLM` (masked.py). Either way
the initial prefix is the keys/values of P random real tokens run through the model (the MeZO paper's
initialisation), and the learned tensor has one layout (kv.py), [P, layers * 2 * heads * head_dim].
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models import model_kind
from .causal import add_causal_prefix
from .kv import LearnedKV, learned_kv
from .masked import CONFIG_NAME, PrefixMaskedLM

__all__ = ["add_prefix", "learned_kv", "LearnedKV", "PrefixMaskedLM", "is_masked_prefix", "load_masked_prefix"]


def add_prefix(model: nn.Module, tokens: int, *, seed: int = 0) -> nn.Module:
    """``model`` (an unwrapped causal or masked LM, as ``models.load_model`` returns it) with ``tokens`` learned
    KV prefix vectors per layer, initialised from the activations of ``tokens`` real tokens drawn with ``seed``.
    Returns the wrapper (peft's for a causal LM, :class:`PrefixMaskedLM` for a masked one), in eval mode."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"prefix tokens must be an int >= 1, got {tokens!r}")
    kind = model_kind(model)
    if kind == "causal":
        return add_causal_prefix(model, tokens, seed)
    if kind == "masked":
        return PrefixMaskedLM(model, tokens, seed=seed)
    raise ValueError(f"prefix tuning needs a causal or masked LM, got {type(model).__name__}")


def is_masked_prefix(path: str | Path) -> bool:
    """Whether the adapter folder ``path`` holds a masked-LM prefix (else it is peft's)."""
    return (Path(path) / CONFIG_NAME).is_file()


def load_masked_prefix(model: nn.Module, path: str | Path) -> PrefixMaskedLM:
    """``model`` with the masked-LM prefix saved in ``path`` (:meth:`PrefixMaskedLM.save_pretrained`)."""
    return PrefixMaskedLM.from_pretrained(model, path)
