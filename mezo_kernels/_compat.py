"""The one door to private or version-dependent names of torch, transformers, peft, gguf and Triton.

No other module of the package imports a private name (a leading underscore, or a module path with one) of those
libraries, nor branches on their versions: it calls a narrow function here instead. Each function has a contract
test in ``tests/test_compat.py`` that fails when an upgrade changes what it relies on, so a new version breaks
loudly, in one place.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import nn

__all__ = ["CompatError", "param_version", "bump_version", "swap_parameter", "ATTENTION_KERNELS",
           "attention_with_lse", "sdpa_kernels_used", "dtype_kwargs", "lm_class_names", "LlamaLayerParts",
           "LlamaParts", "llama_missing", "llama_parts", "apply_rope", "gguf_parse_once", "triton_interpreting",
           "triton_specialize", "LoraAdapter", "lora_adapters", "lora_delta_off", "is_dtensor", "DTensorBox",
           "dtensor_box", "placement_kind", "dtensor_from_local", "root_mesh", "fsdp_modules",
           "fsdp_dp_mesh", "PeftPrefix", "peft_prefix", "output_cache", "cache_kv", "attention_cache_kwarg"]


class CompatError(RuntimeError):
    """A library returned something other than what this package relies on: an upgrade changed its behaviour."""


# ---------------------------------------------------------------------------------------------- torch: versions
def param_version(params: Iterable[torch.Tensor]) -> tuple:
    """``((data_ptr, _version), ...)`` of ``params``: changes on every in-place write (torch bumps ``_version``)
    and when a tensor's storage is replaced (another address). The forward engine keys its caches on it."""
    return tuple((p.data_ptr(), p._version) for p in params)


def bump_version(tensors: Iterable[torch.Tensor]) -> None:
    """Bump the version counter of ``tensors`` as an in-place op would: the kernels write through raw pointers,
    which torch cannot see, so version-keyed caches would otherwise go stale."""
    from torch.autograd.graph import increment_version
    increment_version(list(tensors))


def swap_parameter(module: nn.Module, name: str, value: torch.Tensor | None) -> torch.Tensor | None:
    """Store ``value`` (any tensor, not necessarily a Parameter) where ``module``'s own parameter ``name`` lives
    and return what was there: ``module.name`` reads ``value`` until swapped back, while ``state_dict`` names and
    hooks stay as they are. ``setattr`` would refuse a plain tensor over a Parameter, hence the private table.
    KeyError when ``module`` has no parameter ``name`` of its own."""
    table = module._parameters
    if name not in table:
        raise KeyError(f"{type(module).__name__} has no parameter {name!r} of its own")
    old = table[name]
    table[name] = value
    return old


# ---------------------------------------------------------------------------------------------- torch: DTensor, FSDP2
def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``; costs no import: nothing can be a DTensor before
    torch's DTensor module is loaded."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


@dataclass(frozen=True)
class DTensorBox:
    """Where this rank's local tensor of a DTensor lies in the global one: ``local`` (the plain local tensor,
    detached: it shares storage and version counter with the DTensor's), ``global_shape``, and the block
    ``offset[d] : offset[d] + local.shape[d]`` of every dim; ``in_mesh``: False when this rank holds no part."""

    local: torch.Tensor
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    in_mesh: bool


def dtensor_box(t: torch.Tensor) -> DTensorBox:
    """The :class:`DTensorBox` of DTensor ``t`` (torch's ``compute_local_shape_and_global_offset``, the function
    distributed checkpointing uses; it handles uneven chunks and FSDP2's ``_StridedShard`` over TP shards). The
    caller checks the placements first (:func:`placement_kind`): the box describes a ``Partial`` tensor's
    summand, not a slice of it."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    with torch.no_grad():
        local = t.to_local().detach()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    in_mesh = len(offset) == len(t.shape)
    if in_mesh and tuple(shape) != tuple(local.shape):
        raise CompatError(f"torch {torch.__version__}: local shape {tuple(local.shape)} but "
                          f"compute_local_shape_and_global_offset says {tuple(shape)}")
    return DTensorBox(local, tuple(int(d) for d in t.shape), tuple(int(o) for o in offset), in_mesh)


def placement_kind(p: Any) -> tuple[str, int | None, int]:
    """``(kind, dim, split_factor)`` of a DTensor placement: kind ``"shard"`` (``Shard(dim)``), ``"strided"``
    (``_StridedShard(dim, split_factor)``, FSDP2's shard of a TP shard), ``"replicate"``, ``"partial"`` or
    ``"other"``; dim None and split_factor 1 where they do not apply."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    if isinstance(p, _StridedShard):
        return "strided", int(p.dim), int(p.split_factor)
    if isinstance(p, Shard):
        return "shard", int(p.dim), 1
    if isinstance(p, Replicate):
        return "replicate", None, 1
    if isinstance(p, Partial):
        return "partial", None, 1
    return "other", None, 1


def dtensor_from_local(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A DTensor over ``local`` with the mesh, placements, global shape and stride of DTensor ``like`` (no
    communication, no check)."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def root_mesh(mesh: Any) -> Any:
    """The mesh ``mesh`` was sliced from (``mesh2d["dp"]`` -> ``mesh2d``); ``mesh`` itself when not a slice."""
    return mesh._get_root_mesh()


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that FSDP2's ``fully_shard`` manages (``FSDPModule``), in ``modules()`` order; []
    without an import when FSDP2 was never loaded."""
    if "torch.distributed.fsdp" not in sys.modules:
        return []
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp_dp_mesh(module: nn.Module) -> Any:
    """The data-parallel mesh that ``fully_shard`` shards (1-d) or shards and replicates (2-d HSDP) ``module``'s
    parameters over; None when it manages no parameter of its own."""
    state = module._get_fsdp_state()
    for group in state._fsdp_param_groups:
        return group.mesh_info.mesh
    return None


# ---------------------------------------------------------------------------------------------- torch: attention
ATTENTION_KERNELS = ("cpu-flash", "cuda-flash", "cuda-efficient")


def attention_with_lse(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                       scale: float, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k``/``v`` and its natural-log log-sum-exp, through one of aten's SDPA kernels
    (the public ``scaled_dot_product_attention`` does not return the lse).

    kernel: ``"cpu-flash"`` (``_scaled_dot_product_flash_attention_for_cpu``: any float dtype; ``bias``
        broadcastable to [B, H, L, S]), ``"cuda-flash"`` (``_scaled_dot_product_flash_attention``: fp16/bf16,
        no bias) or ``"cuda-efficient"`` (``_scaled_dot_product_efficient_attention``: ``bias`` [B, H, L, S]).
    q [B, H, L, D]; k, v [B, H, S, D] (as many heads as q); bias: additive, q's dtype, or None.
    Returns out [B, H, L, D] in q's dtype and lse [B, H, L] in the kernel's dtype (float32; float64 for float64
    on the CPU). Raises the kernel's RuntimeError for inputs it refuses, and CompatError when the result is not
    an (out, lse, ...) tuple of those shapes.
    """
    aten = torch.ops.aten
    args = dict(query=q, key=k, value=v, dropout_p=0.0, is_causal=causal, scale=scale)
    if kernel == "cpu-flash":
        r = aten._scaled_dot_product_flash_attention_for_cpu(**args, attn_mask=bias)
    elif kernel == "cuda-flash":
        if bias is not None:
            raise ValueError("the cuda-flash kernel takes no bias; use cuda-efficient")
        r = aten._scaled_dot_product_flash_attention(**args, return_debug_mask=False)
    elif kernel == "cuda-efficient":
        r = aten._scaled_dot_product_efficient_attention(**args, attn_bias=bias, compute_log_sumexp=True)
    else:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {ATTENTION_KERNELS}")
    B, H, L, _ = q.shape
    out_shape = (B, H, L, v.shape[-1])
    lse = r[1] if isinstance(r, (tuple, list)) and len(r) >= 2 else None
    # the memory-efficient kernel pads the lse to a multiple of 32 query rows; the others return exactly L
    if (lse is None or tuple(r[0].shape) != out_shape or lse.dim() != 3 or tuple(lse.shape[:2]) != (B, H)
            or lse.shape[2] < L):
        got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
               for t in (r if isinstance(r, (tuple, list)) else [r])]
        raise CompatError(f"{kernel}: torch {torch.__version__} returned {got}; expected (out {out_shape}, "
                          f"lse ({B}, {H}, >={L}), ...)")
    return r[0], lse[..., :L]


def sdpa_kernels_used(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """Run ``fn(*args, **kwargs)`` and list the SDPA kernels (aten ops) it dispatched, in first-call order, e.g.
    ``['aten._scaled_dot_product_flash_attention_for_cpu.default']``: which backend actually ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "scaled_dot_product" in name and name not in seen:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    with _Record():
        result = fn(*args, **kwargs)
    return result, seen


# ---------------------------------------------------------------------------------------------- transformers
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


# ---------------------------------------------------------------------------------------------- gguf
@contextlib.contextmanager
def gguf_parse_once() -> Iterator[None]:
    """Speed up a GGUF load about 2x: transformers builds a ``gguf.GGUFReader`` (about 5 s of metadata parsing
    for SmolLM2's 49k-token vocab) once for the tokenizer, once for the config and once for the weights, and a
    ``gguf.TensorNameMap`` once per submodule. Inside this context both are memoized (same file, same arguments,
    read-only objects); the gguf module is restored afterwards. It works because transformers looks both names
    up in the gguf module when it calls them; without gguf it does nothing."""
    try:
        import gguf
    except ImportError:
        yield
        return
    orig = {k: getattr(gguf, k, None) for k in ("GGUFReader", "get_tensor_name_map")}
    if None in orig.values():
        yield
        return
    readers: dict[tuple[str, str], Any] = {}
    maps: dict[tuple, Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = orig["GGUFReader"](path, mode)
        return readers[key]

    def name_map(*args: Any) -> Any:
        if args not in maps:
            maps[args] = orig["get_tensor_name_map"](*args)
        return maps[args]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = orig["GGUFReader"], orig["get_tensor_name_map"]
        readers.clear()


# ---------------------------------------------------------------------------------------------- peft: LoRA
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


# ---------------------------------------------------------------------------------------------- prefix tuning
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
    if str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "PREFIX_TUNING" or getattr(model, "_adapters_disabled", False):
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


# ---------------------------------------------------------------------------------------------- Triton
def triton_interpreting(jit_fn: Any) -> bool:
    """True when ``jit_fn`` (a ``@triton.jit`` function) runs in Triton's interpreter (``TRITON_INTERPRET=1`` was
    set before it was decorated) rather than being compiled."""
    return type(jit_fn).__name__ == "InterpretedFunction"


def triton_specialize(value: Any, specialize: bool, align: bool) -> tuple[str, Any]:
    """``(type string, specialization key)`` of one kernel argument as Triton's JIT specializes a call (the JIT's
    own ``native_specialize_impl``, Triton 3.6 and 3.9): for ahead-of-time compiles that match a real launch."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    return native_specialize_impl(BaseBackend, value, False, specialize, align)
