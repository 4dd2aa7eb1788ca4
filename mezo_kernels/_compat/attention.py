"""Torch: scaled-dot-product attention kernels that return the log-sum-exp (part of :mod:`mezo_kernels._compat`)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from .tensors import CompatError


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
