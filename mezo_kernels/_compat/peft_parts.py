"""Peft: LoRA adapters, the prefix-tuning prefix, and transformers' KV caches (part of :mod:`mezo_kernels._compat`)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .tensors import CompatError


@dataclass(frozen=True)
class LoraAdapter:
    """One active adapter of a peft LoRA ``Linear``: its delta is ``scaling * (dropout(x) @ A.T) @ B.T`` with
    ``A`` [r, in] and ``B`` [out, r] (the ``lora_A``/``lora_B`` Linear weights, the stored parameters)."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: nn.Module


def lora_adapters(module: nn.Module) -> list[LoraAdapter] | None:
    """The active adapters of ``module`` when it is a peft LoRA ``Linear``, else None. Raises ValueError for a
    LoRA Linear whose output the plain formula above does not describe: merged or disabled adapters, a variant
    (DoRA and the like) or a bias on ``lora_B``."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    if not isinstance(module, Linear):
        return None
    if module.merged or module.disable_adapters:
        raise ValueError(f"LoRA layer {type(module).__name__} has {'merged' if module.merged else 'disabled'} "
                         "adapters; the grouped delta needs them active and unmerged")
    out = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}):
            raise ValueError(f"adapter {name!r} is a LoRA variant ({type(module.lora_variant[name]).__name__}); "
                             "only plain LoRA deltas can be grouped")
        if module.lora_B[name].bias is not None:
            raise ValueError(f"adapter {name!r} has a bias on lora_B; only plain LoRA deltas can be grouped")
        out.append(LoraAdapter(name, module.lora_A[name].weight, module.lora_B[name].weight,
                               float(module.scaling[name]), module.lora_dropout[name]))
    return out


@contextlib.contextmanager
def lora_delta_off(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, each peft LoRA layer in ``modules`` returns its base layer's output only (peft's own
    adapter delta is skipped); the flags come back on exit, also after an exception. peft's public
    ``enable_adapters(False)`` would also clear ``requires_grad`` on the adapters, which callers read."""
    saved = [(m, m._disable_adapters) for m in modules]
    try:
        for m, _ in saved:
            m._disable_adapters = True
        yield
    finally:
        for m, flag in saved:
            m._disable_adapters = flag


@dataclass(frozen=True)
class PeftPrefix:
    """The active, enabled prefix-tuning adapter of a peft model: ``encoder`` (the module owning ``weight``, the
    learned prefix [P, layers * 2 * heads * head_dim]) run on ``tokens`` [1, P] gives the prefix the forward sees,
    [1, P, layers * 2 * heads * head_dim]; ``dtype``: what peft casts it to before the attention (None: as is)."""

    encoder: nn.Module
    tokens: torch.Tensor
    weight: torch.Tensor
    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype | None


def peft_prefix(model: nn.Module) -> PeftPrefix | None:
    """:class:`PeftPrefix` of ``model`` when it is a peft model whose active adapter is prefix tuning and is not
    disabled (``disable_adapter()`` blocks), else None. ValueError for a projected prefix (``prefix_projection``:
    an MLP computes it, so the parameters are not the key/value vectors)."""
    configs = getattr(model, "peft_config", None)
    name = getattr(model, "active_adapter", None)
    if not isinstance(configs, dict) or not isinstance(name, str) or name not in configs:
        return None
    cfg = configs[name]
    if (str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "PREFIX_TUNING"
            or getattr(model, "_adapters_disabled", False)):
        return None
    if cfg.prefix_projection:
        raise ValueError("prefix tuning with prefix_projection=True (a reparameterised prefix) is not supported: "
                         "the learned key/value vectors must be the parameters")
    encoder, n = model.prompt_encoder[name], cfg.num_virtual_tokens
    tokens = model.prompt_tokens[name][:n].unsqueeze(0).to(encoder.embedding.weight.device)
    return PeftPrefix(encoder, tokens, encoder.embedding.weight, cfg.num_layers, cfg.num_attention_heads,
                      cfg.token_dim // cfg.num_attention_heads, model.base_model_torch_dtype)


def output_cache(out: Any) -> Any:
    """The KV cache a forward with ``use_cache=True`` returned: the output's ``cache`` (transformers >= 5.2x, where
    ``past_key_values`` is a deprecated alias), else its ``past_key_values``; None when it returned none."""
    keys = out.keys() if hasattr(out, "keys") else ()
    return out["cache"] if "cache" in keys else getattr(out, "past_key_values", None)


def cache_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, heads, tokens, head_dim] of ``layer`` in a transformers ``DynamicCache`` (the
    ``past_key_values`` of a forward with ``use_cache=True``): ``cache.layers[i]`` since transformers 4.56,
    ``key_cache``/``value_cache`` lists before."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def attention_cache_kwarg(attention: nn.Module) -> str:
    """The keyword under which a transformers self-attention module (``RobertaSelfAttention``, ...) takes a KV
    cache, an object with ``update(key, value, layer_idx, ...) -> (keys, values)`` that it attends with instead of
    its own ``key``/``value``: ``cache`` (transformers >= 5.2x), ``past_key_values`` or ``past_key_value`` before.
    CompatError when its forward takes none of them."""
    import inspect
    params = inspect.signature(attention.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    raise CompatError(f"{type(attention).__name__}.forward takes no KV cache argument (looked for cache, "
                      f"past_key_values, past_key_value); this transformers version is not supported for prefix "
                      "tuning of masked LMs")
