"""MeZO-prefix for masked LMs (RoBERTa, BERT), whose forward takes no ``past_key_values`` (so peft's prefix tuning
cannot reach it): learned key/value prefixes inserted in every self-attention, as the MeZO reference does.

:class:`PrefixMaskedLM` wraps the model (composition: the wrapped model is untouched but for one forward pre-hook
per self-attention). Its forward computes the prefix once, then runs the model; each self-attention's hook hands
the module a cache object whose ``update`` puts the layer's P prefix keys/values before the tokens' own, and adds P
always-attending columns in front of the attention mask (bool: True, additive: 0), so every query, padding
included, attends to the prefix, and no real token attends to padding. Called without the wrapper the model
computes what it did before.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _compat
from .kv import KV, LearnedKV, from_layers, real_tokens, to_layers

__all__ = ["PrefixMaskedLM", "self_attentions", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME, WEIGHTS_NAME = "mezo_prefix.json", "mezo_prefix.safetensors"
_FORMAT = 1


def self_attentions(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a BERT-family encoder (``query``/``key``/``value`` projections), in layer
    order; ValueError unless there is exactly one per layer."""
    found = [m for m in model.modules() if type(m).__name__.endswith("SelfAttention")
             and all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value"))]
    n = getattr(model.config, "num_hidden_layers", None)
    if not found or len(found) != n:
        raise ValueError(f"{type(model).__name__}: found {len(found)} BERT-style self-attention modules for {n} "
                         "layers; masked-LM prefix tuning supports the RoBERTa/BERT layout")
    return found


class _Prepend:
    """A one-layer 'cache' for one forward: ``update`` returns the prefix then the tokens' keys/values."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        B = key.shape[0]
        k = self.k.to(key.dtype).expand(B, -1, -1, -1)
        v = self.v.to(value.dtype).expand(B, -1, -1, -1)
        return torch.cat((k, key), dim=2), torch.cat((v, value), dim=2)


class _Record:
    """A one-layer 'cache' that keeps the tokens' keys/values and attends with them unchanged."""

    kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        self.kv = (key, value)
        return key, value


def _with_cache(attention: nn.Module, cache: Any, prefix: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The self-attention's arguments with ``cache`` passed and ``prefix`` attending columns before the mask."""
    name = _compat.attention_cache_kwarg(attention)
    if kwargs.get(name) is not None:
        raise ValueError(f"{type(attention).__name__} was called with a {name}; prefix tuning brings its own")
    kwargs = {**kwargs, name: cache}
    positional = "attention_mask" not in kwargs and len(args) > 1
    am = args[1] if positional else kwargs.get("attention_mask")
    if am is not None and prefix:
        if am.dim() != 4:
            raise ValueError(f"expected a 4-D attention mask [B, 1, queries, keys], got {tuple(am.shape)}")
        fill = torch.ones if am.dtype == torch.bool else torch.zeros       # attend: True, or an additive 0
        am = torch.cat((fill((*am.shape[:-1], prefix), dtype=am.dtype, device=am.device), am), dim=-1)
        if positional:
            args = (args[0], am, *args[2:])
        else:
            kwargs["attention_mask"] = am
    return args, kwargs


def record_kv(model: nn.Module, ids: torch.Tensor) -> KV:
    """Per layer (k, v) [1, heads, T, head_dim] of the tokens ``ids`` [1, T] run through ``model`` alone."""
    caches = [_Record() for _ in self_attentions(model)]
    hooks = [a.register_forward_pre_hook(lambda m, a_, kw, c=c: _with_cache(m, c, 0, a_, kw), with_kwargs=True)
             for a, c in zip(self_attentions(model), caches)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return [c.kv for c in caches]


class PrefixMaskedLM(nn.Module):
    """``base`` (a ``*ForMaskedLM``) with ``tokens`` learned key/value vectors per self-attention layer.

    ``prefix``: an ``nn.Embedding`` whose weight [P, layers * 2 * heads * head_dim] (kv.py's layout; float32 for
    a float16/bfloat16 model) is the only trainable tensor; ``base``'s parameters are frozen. ``init``: that weight's initial value; None takes the keys
    and values of ``tokens`` random real tokens (drawn with ``seed``) run through ``base`` (the paper's
    initialisation). peft's model interface where the package uses it: ``get_base_model``, ``save_pretrained``,
    :meth:`from_pretrained`.
    """

    def __init__(self, base: nn.Module, tokens: int, *, seed: int = 0, init: torch.Tensor | None = None) -> None:
        super().__init__()
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"prefix tokens must be an int >= 1, got {tokens!r}")
        attentions = self_attentions(base)
        a = attentions[0]
        self.layers, self.heads, self.head_dim = len(attentions), a.num_attention_heads, a.attention_head_size
        p = next(base.parameters())
        if init is None:
            init = from_layers(record_kv(base, real_tokens(base, tokens, seed)))
        width = self.layers * 2 * self.heads * self.head_dim
        if tuple(init.shape) != (tokens, width):
            raise ValueError(f"prefix init of shape {tuple(init.shape)}; this model needs ({tokens}, {width})")
        self.base = base
        for q in base.parameters():
            q.requires_grad_(False)
        # a half-precision model keeps its (small) prefix in float32, as peft does; the attention casts it
        dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
        self.prefix = nn.Embedding(tokens, width, device=p.device, dtype=dtype)
        with torch.no_grad():
            self.prefix.weight.copy_(init)
        self.register_buffer("ids", torch.arange(tokens, device=p.device), persistent=False)
        self._now: KV | None = None                   # the prefix of the forward running now
        self._hooks = [att.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                       for i, att in enumerate(attentions)]
        self.eval()

    @property
    def config(self):
        return self.base.config

    @property
    def tokens(self) -> int:
        return self.prefix.num_embeddings

    def get_base_model(self) -> nn.Module:
        return self.base

    def learned_kv(self) -> LearnedKV:
        """The prefix as the forward sees it (calls ``prefix``, so virtual perturbation hooks apply)."""
        flat = self.prefix(self.ids).unsqueeze(0)
        return LearnedKV(to_layers(flat, self.layers, self.heads, self.head_dim), (self.prefix.weight,))

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            if self._now is None:                     # the base model called on its own: no prefix
                return None
            k, v = self._now[i]
            return _with_cache(module, _Prepend(k, v), k.shape[2], args, kwargs)
        return hook

    def forward(self, *args: Any, **kwargs: Any):
        if self._now is not None:
            raise RuntimeError("PrefixMaskedLM.forward does not nest")
        self._now = self.learned_kv().kv               # once per forward, shared by every layer's hook
        try:
            return self.base(*args, **kwargs)
        finally:
            self._now = None

    # ------------------------------------------------------------------------------------------ files
    def save_pretrained(self, path: str | Path, state_dict: dict | None = None, **_: Any) -> None:
        """``path/mezo_prefix.json`` (the shape) and ``path/mezo_prefix.safetensors`` (the prefix, key
        ``prefix``). ``state_dict``: tensors to save instead of the module's own (``prefix.weight`` is read)."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weight = (state_dict or {}).get("prefix.weight", self.prefix.weight)
        save_file({"prefix": weight.detach().contiguous().cpu()}, str(path / WEIGHTS_NAME))
        meta = {"format": _FORMAT, "kind": "mezo-prefix-masked", "tokens": self.tokens, "layers": self.layers,
                "heads": self.heads, "head_dim": self.head_dim, "model_type": self.config.model_type}
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=1))

    @classmethod
    def from_pretrained(cls, base: nn.Module, path: str | Path) -> "PrefixMaskedLM":
        """``base`` with the prefix saved in ``path``; ValueError when it was trained on another shape."""
        from safetensors.torch import load_file
        path = Path(path)
        meta = json.loads((path / CONFIG_NAME).read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path / CONFIG_NAME}: unknown prefix format {meta.get('format')!r}")
        init = load_file(str(path / WEIGHTS_NAME))["prefix"]
        try:
            return cls(base, int(meta["tokens"]), init=init)
        except ValueError as e:
            raise ValueError(f"the prefix in {path} does not fit {type(base).__name__}: {e}") from None
