"""MeZO-prefix for causal LMs through peft's ``PrefixTuningConfig`` (no reparameterisation: the learned tensor is
the key/value prefix itself), initialised from real activations.

peft hands the prefix to the model as a KV cache of length P, so the tokens of a row sit at positions
``P, P + 1, ...`` (with RoPE the prefix keys meet queries rotated by those positions); the forward engine places
them alike.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _compat
from .kv import KV, from_layers, real_tokens

__all__ = ["add_causal_prefix", "cached_kv"]


def cached_kv(model: nn.Module, ids: torch.Tensor) -> KV:
    """Per layer (k, v) [1, kv heads, T, head_dim] that ``model`` caches for the tokens ``ids`` [1, T] (positions
    0..T-1; keys after RoPE)."""
    with torch.no_grad():
        cache = _compat.output_cache(model(input_ids=ids, use_cache=True))
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no KV cache; prefix tuning needs one")
    n = model.config.num_hidden_layers
    return [_compat.cache_kv(cache, i) for i in range(n)]


def add_causal_prefix(model: nn.Module, tokens: int, seed: int = 0) -> nn.Module:
    """``model`` (an unwrapped ``*ForCausalLM``) wrapped in a peft prefix-tuning model with ``tokens`` virtual
    tokens whose keys/values start as those of ``tokens`` random real tokens (drawn with ``seed``). Only the prefix
    [P, layers * 2 * kv heads * head_dim] is trainable afterwards; the model is in eval mode."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    init = from_layers(cached_kv(model, real_tokens(model, tokens, seed)))
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tokens))
    peft_model.eval()
    pp = _compat.peft_prefix(peft_model)
    if pp is None or tuple(pp.weight.shape) != tuple(init.shape):
        got = None if pp is None else tuple(pp.weight.shape)
        raise ValueError(f"peft's prefix for {type(model).__name__} has shape {got}, its cached keys/values "
                         f"{tuple(init.shape)}: this architecture's cache layout is not supported")
    with torch.no_grad():
        pp.weight.copy_(init)
    return peft_model
