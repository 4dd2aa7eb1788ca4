"""The learned KV prefix as tensors: peft's flat layout, per-layer keys/values, the prefix a model computes with
now, and the real tokens its initial values come from.

Layout (peft's, used by both routes so that one saved format describes both): the learned tensor is
[P, layers * 2 * heads * head_dim]; entry ``[p, ((2 * i + j) * heads + h) * head_dim + d]`` is token ``p``'s key
(``j = 0``) or value (``j = 1``) of layer ``i``, head ``h``. Keys are stored as the attention uses them (after any
rotary embedding), so the prefix has no position of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import _compat

__all__ = ["LearnedKV", "to_layers", "from_layers", "real_tokens", "learned_kv"]

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LearnedKV:
    """A model's learned prefix as its forward sees it now (virtual perturbation included): ``kv[i] = (k, v)``,
    each [1, heads, P, head_dim] for attention layer ``i``; ``params``: the stored tensors it is computed from
    (their versions and perturbations key any cache that depends on it)."""

    kv: KV
    params: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        return self.kv[0][0].shape[2]


def to_layers(flat: torch.Tensor, layers: int, heads: int, head_dim: int) -> KV:
    """[B, P, layers * 2 * heads * head_dim] (the layout above) -> per layer (k, v), each [B, heads, P, head_dim]
    (views of ``flat``)."""
    B, P, width = flat.shape
    if width != layers * 2 * heads * head_dim:
        raise ValueError(f"a prefix of width {width} is not {layers} layers x 2 x {heads} heads x {head_dim}")
    x = flat.view(B, P, layers * 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    return [(x[2 * i], x[2 * i + 1]) for i in range(layers)]


def from_layers(kv: KV) -> torch.Tensor:
    """Per layer (k, v) [1, heads, P, head_dim] -> the flat [P, layers * 2 * heads * head_dim] (inverse of
    :func:`to_layers` for one row)."""
    x = torch.stack([torch.stack((k[0], v[0])) for k, v in kv])         # [layers, 2, heads, P, head_dim]
    return x.permute(3, 0, 1, 2, 4).reshape(x.shape[3], -1)


def real_tokens(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    """[1, n] token ids drawn uniformly from the model's vocabulary by a generator seeded with ``seed`` (the global
    RNG is untouched): the tokens whose keys and values initialise the prefix (the MeZO paper's initialisation
    from real activations; its reference draws them the same way)."""
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, vocab, (1, n), generator=g).to(next(model.parameters()).device)


def learned_kv(model: nn.Module) -> LearnedKV | None:
    """The learned prefix ``model`` computes with now, or None when it has none (or its adapter is disabled).

    A masked LM wrapped by :class:`~mezo_kernels.prefix.masked.PrefixMaskedLM` or a peft prefix-tuning model. The
    prefix is computed by calling the module that owns the parameter, so a virtual perturbation's hooks show the
    perturbed values; call it once per forward and share the result across rows."""
    own = getattr(model, "learned_kv", None)
    if callable(own):
        return own()
    pp = _compat.peft_prefix(model)
    if pp is None:
        return None
    flat = pp.encoder(pp.tokens)
    if pp.dtype is not None:
        flat = flat.to(pp.dtype)
    return LearnedKV(to_layers(flat, pp.layers, pp.heads, pp.head_dim), (pp.weight,))
