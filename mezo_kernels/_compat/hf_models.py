"""Transformers: dtype keywords, class names, the parts of a Llama (part of :mod:`mezo_kernels._compat`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` / ``from_config`` keyword that sets the weights' dtype: ``dtype=`` since
    transformers 4.56, ``torch_dtype=`` before (now deprecated)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def lm_class_names(kind: Literal["causal", "masked"]) -> dict[str, str]:
    """``{model_type: class name}`` of transformers' causal-LM (``AutoModelForCausalLM``) or masked-LM
    (``AutoModelForMaskedLM``) classes, e.g. ``"llama" -> "LlamaForCausalLM"``."""
    from transformers.models.auto import modeling_auto as ma

    table = {"causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "masked": "MODEL_FOR_MASKED_LM_MAPPING_NAMES"}
    if kind not in table:
        raise ValueError(f"kind must be 'causal' or 'masked', got {kind!r}")
    return {t: c for t, c in getattr(ma, table[kind]).items() if isinstance(c, str)}


@dataclass(frozen=True)
class LlamaLayerParts:
    """The modules of one ``LlamaDecoderLayer`` (peft LoRA layers stay wrapped inside the projections), in the
    order its forward calls them: ``input_norm``; ``q_proj``/``k_proj``/``v_proj``; rotary embedding
    (:func:`apply_rope`); attention with ``scaling``; then :meth:`finish`."""

    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    post_norm: nn.Module
    mlp: nn.Module
    head_dim: int
    scaling: float

    def finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of the layer: ``h`` [B, L, hidden] the layer input, ``attn`` [B, L, H * head_dim] the
        attention output with heads merged -> o_proj, residual, post norm, MLP, residual."""
        h = h + self.o_proj(attn)
        return h + self.mlp(self.post_norm(h))


@dataclass(frozen=True)
class LlamaParts:
    """The modules of a Llama ``*ForCausalLM``: ``embed_tokens``, ``layers`` (the decoder layers themselves, for
    their parameters) with ``parts`` (one :class:`LlamaLayerParts` each), final ``norm``, ``lm_head``."""

    embed_tokens: nn.Module
    layers: list
    parts: list
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [rows, tokens, head_dim] for ``positions`` [rows, tokens] (``h`` gives dtype and device)."""
        return self.rotary_emb(h, positions)


_BODY = ("model", "lm_head", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb")
_LAYER = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn", "self_attn.q_proj",
          "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.head_dim", "self_attn.scaling")


def _has(obj: Any, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def _decoder_layers(lm: nn.Module) -> list:
    n = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    return list(lm.model.layers)[:n]


def llama_missing(lm: nn.Module) -> list[str]:
    """The attributes of the Llama module layout that ``lm`` lacks (``model.layers[0].mlp``, ...); [] when
    :func:`llama_parts` can take it apart."""
    missing = [a for a in _BODY if not _has(lm, a)]
    if not missing:
        for i, layer in enumerate(_decoder_layers(lm)):
            missing += [f"model.layers[{i}].{a}" for a in _LAYER if not _has(layer, a)]
    return missing


def llama_parts(lm: nn.Module) -> LlamaParts:
    """``lm`` (an unwrapped Llama ``*ForCausalLM``) taken apart; ValueError naming every missing attribute."""
    missing = llama_missing(lm)
    if missing:
        raise ValueError(f"{type(lm).__name__} does not have the Llama module layout: missing {', '.join(missing)}")
    body, layers = lm.model, _decoder_layers(lm)
    parts = [LlamaLayerParts(x.input_layernorm, x.self_attn.q_proj, x.self_attn.k_proj, x.self_attn.v_proj,
                             x.self_attn.o_proj, x.post_attention_layernorm, x.mlp, x.self_attn.head_dim,
                             x.self_attn.scaling) for x in layers]
    return LlamaParts(body.embed_tokens, layers, parts, body.norm, body.rotary_emb, lm.lm_head)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary embedding on q, k [B, heads, L, D] with cos, sin [B, L, D] (rotate-half convention)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    return apply_rotary_pos_emb(q, k, cos, sin)
