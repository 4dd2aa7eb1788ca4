"""The learned KV prefix of a prefix-tuned model (MeZO-prefix) as one more attention part of every entry.

The prefix is shared by every row, so it is computed once per engine forward (once per +/- pass: with the pass's
perturbation, virtual included), and each layer's entries (segment batches and rows alike) attend to its P keys
non-causally, merged by log-sum-exp with their other parts, the prefix read in place, never copied per row.
Everything the engine caches depends on it: the caller keys caches on :meth:`EnginePrefix.key` and starts
frozen-layer reuse at layer 0 (every layer attends to a trainable prefix). Token positions start after it, at P,
as peft places them. :data:`EnginePrefix.NONE` stands for a model without one (length 0, no parts).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..prefix import LearnedKV, learned_kv
from ..virtual import state as weight_state
from .._compat import param_version
from .llama import GroupLayout

__all__ = ["EnginePrefix"]


class EnginePrefix:
    """The learned prefix of one engine forward (:meth:`of`): ``kv[i]`` = layer i's (k, v) [1, Hkv, P, D] in the
    forward's dtype and device; ``length`` P."""

    NONE: ClassVar["EnginePrefix"]

    def __init__(self, learned: LearnedKV | None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        self.kv = [] if learned is None else [(k.to(device, dtype), v.to(device, dtype)) for k, v in learned.kv]
        self.length = 0 if learned is None else learned.length
        self._params = [] if learned is None else list(learned.params)
        self._layouts: dict[int, GroupLayout] = {}
        self.device = device

    @classmethod
    def of(cls, model: nn.Module, dtype: torch.dtype, device: torch.device) -> "EnginePrefix":
        """``model``'s learned prefix now (through the module that owns it), or :data:`NONE`."""
        learned = learned_kv(model)
        return cls.NONE if learned is None else cls(learned, dtype, device)

    def key(self) -> tuple | None:
        """What the prefix's values are now: length, the stored tensors' addresses and versions, any virtual
        perturbation of them (None without a prefix)."""
        if not self.length:
            return None
        return ("learned-prefix", self.length, param_version(self._params), weight_state.key(self._params))

    def parts(self, i: int, h: torch.Tensor) -> list:
        """Layer ``i``'s prefix as attention parts ``[(k, v, layout)]`` attended by every entry of the batch ``h``
        [B, T, hidden] ([] without a prefix)."""
        if not self.length:
            return []
        batch = h.shape[0]
        lay = self._layouts.get(batch)
        if lay is None:
            lay = self._layouts[batch] = GroupLayout.build([list(range(batch))], [self.length], batch, self.device)
        k, v = self.kv[i]
        return [(k, v, lay)]


EnginePrefix.NONE = EnginePrefix(None)
