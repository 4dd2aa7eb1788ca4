"""Attention kernels that also return the log-sum-exp, so attention split over key segments merges exactly.

The prefix-reuse forward computes a row's attention in two parts: over the shared prefix's keys (kept once per group,
never copied per row) and over the row's own suffix keys. Softmax over the union of both key sets equals the two
partial softmaxes re-weighted by their log-sum-exps (cascade attention), so each part can run the flash kernel with
*no mask at all*: the prefix part is full (every suffix token comes after every prefix token) and the suffix part is
square causal, where upper-left and lower-right alignment coincide. That keeps the flash path; a concatenated
prefix+suffix key set would need a lower-right causal mask per row and a copy of the prefix per row.

Shapes: ``q`` [B, H, L, D]; ``k``, ``v`` [B, Hkv, S, D] with H a multiple of Hkv (grouped-query attention);
returns ``out`` [B, H, L, D] in q's dtype and ``lse`` [B, H, L] (natural log) in float32, or float64 for
float64 q (the tests run a float64 model to check the algebra tightly).
"""
from __future__ import annotations

import torch

__all__ = ["attend", "merge", "reference", "kernel_for", "sdpa_kernels_used"]

_NEG_INF = float("-inf")


def kernel_for(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel :func:`attend` runs for q of this device and dtype."""
    if device.type == "cpu":
        return "cpu-flash"           # aten::_scaled_dot_product_flash_attention_for_cpu: any float dtype, masks
    if device.type == "cuda":
        # FlashAttention-2 needs fp16/bf16; fp32 goes to the memory-efficient kernel, which also returns the lse
        return "cuda-flash" if dtype in (torch.float16, torch.bfloat16) else "cuda-efficient"
    return "math"


def _fold_heads(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, Hkv, rep*L, D]: the query heads that share a KV head become extra query rows.

    Valid only for non-causal attention (a row's position no longer follows from its index); it lets GQA run
    without repeating K/V."""
    B, H, L, D = q.shape
    return q.reshape(B, hkv, (H // hkv) * L, D)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _run(q, k, v, causal: bool, mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    name, acc = kernel_for(q.device, q.dtype), _acc(q.dtype)
    if name == "cpu-flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return out, lse.to(acc)
    if name == "cuda-flash" and mask is None:
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return r[0], r[1].to(acc)
    if q.device.type == "cuda":
        # memory-efficient kernel: takes an additive bias and pads the lse to a multiple of 32 query rows.
        # Not yet run on a GPU (none was lent when this was written): a shape or alignment it refuses falls
        # back to the reference below rather than failing the forward.
        bias = None if mask is None else mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            r = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal,
                                                                        scale=scale)
            return r[0], r[1][..., :q.shape[2]].to(acc)
        except RuntimeError:
            pass
    return reference(q, k, v, causal, mask, scale)


def reference(q, k, v, causal: bool, mask: torch.Tensor | None, scale: float):
    """Plain matmul-softmax attention with its lse (the test oracle; also the fallback on other devices)."""
    acc = _acc(q.dtype)                                    # float64 inputs stay float64 (the test oracle)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(acc)
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=s.device).triu(1), _NEG_INF)
    lse = s.logsumexp(-1)
    return (s.softmax(-1) @ v.to(acc)).to(q.dtype), lse


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
           key_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k``/``v`` and its log-sum-exp (shapes: module docstring).

    causal: square causal attention (L == S); padding must be at the end of each row (right padding), where no
        real query can see it.
    key_len: optional [B] count of valid keys per batch entry (non-causal only); keys past it are masked out
        (they get weight 0, so they must be finite: 0 * nan is nan).
    """
    B, H, L, D = q.shape
    hkv = k.shape[1]
    if H % hkv:
        raise ValueError(f"{H} query heads is not a multiple of {hkv} KV heads")
    mask = None
    if key_len is not None:
        if causal:
            raise ValueError("key_len is for non-causal attention only")
        cols = torch.arange(k.shape[2], device=q.device)
        mask = torch.zeros(B, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        mask.masked_fill_(cols[None, None, None, :] >= key_len.to(q.device)[:, None, None, None], _NEG_INF)
    if causal:
        if L != k.shape[2]:
            raise ValueError(f"causal attention here is square; got {L} queries and {k.shape[2]} keys")
        if hkv != H:
            k, v = k.repeat_interleave(H // hkv, 1), v.repeat_interleave(H // hkv, 1)
        return _run(q, k, v, True, None, scale)
    out, lse = _run(_fold_heads(q, hkv), k, v, False, mask, scale)
    return out.reshape(B, H, L, D), lse.reshape(B, H, L)


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two key sets from the two partial results (o [.., L, D], lse [.., L]):
    the merged (o, lse), so further key sets can be merged in."""
    lse = torch.logaddexp(lse1, lse2)
    w1, w2 = (lse1 - lse).exp()[..., None], (lse2 - lse).exp()[..., None]
    acc = _acc(o1.dtype)
    return (o1.to(acc) * w1 + o2.to(acc) * w2).to(o1.dtype), lse


def sdpa_kernels_used(fn, *args, **kwargs) -> tuple[object, list[str]]:
    """Run ``fn(*args, **kwargs)`` and list the SDPA kernels (aten ops) it dispatched, e.g.
    ``['aten._scaled_dot_product_flash_attention_for_cpu.default', ...]``: which backend actually ran."""
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
