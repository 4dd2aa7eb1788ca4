"""The one door to private or version-dependent names of torch, transformers, peft, gguf and Triton.

No other module of the package imports a private name (a leading underscore, or a module path with one) of those
libraries, nor branches on their versions: it calls a narrow function here instead. Each function has a contract
test in ``tests/test_compat.py`` that fails when an upgrade changes what it relies on, so a new version breaks
loudly, in one place. One module per library area: ``tensors`` (versions, parameter swaps, the
error), ``dtensor`` (DTensor, FSDP2), ``attention``, ``hf_models`` (transformers), ``gguf_parse``, ``peft_parts`` (LoRA,
prefix tuning, KV caches), ``triton_jit``.
"""
from __future__ import annotations

from .tensors import CompatError, param_version, bump_version, swap_parameter
from .dtensor import (DTensorBox, dtensor_box, dtensor_from_local, fsdp_dp_mesh, fsdp_modules, is_dtensor,
                      placement_kind, root_mesh)
from .attention import ATTENTION_KERNELS, attention_with_lse, sdpa_kernels_used
from .hf_models import (LlamaLayerParts, LlamaParts, apply_rope, dtype_kwargs, llama_missing, llama_parts,
                        lm_class_names)
from .gguf_parse import gguf_parse_once
from .peft_parts import (LoraAdapter, PeftPrefix, attention_cache_kwarg, cache_kv, lora_adapters, lora_delta_off,
                         output_cache, peft_prefix)
from .triton_jit import triton_interpreting, triton_specialize

__all__ = ["CompatError", "param_version", "bump_version", "swap_parameter", "ATTENTION_KERNELS", "attention_with_lse",
           "sdpa_kernels_used", "dtype_kwargs", "lm_class_names", "LlamaLayerParts", "LlamaParts",
           "llama_missing", "llama_parts", "apply_rope", "gguf_parse_once", "triton_interpreting",
           "triton_specialize", "LoraAdapter", "lora_adapters", "lora_delta_off", "is_dtensor", "DTensorBox",
           "dtensor_box", "placement_kind", "dtensor_from_local", "root_mesh", "fsdp_modules", "fsdp_dp_mesh",
           "PeftPrefix", "peft_prefix", "output_cache", "cache_kv", "attention_cache_kwarg"]
