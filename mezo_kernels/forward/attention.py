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

The aten kernels are reached through ``_compat.attention_with_lse``. On CUDA the memory-efficient kernel refuses
some shapes and alignments; the matmul-softmax reference then runs instead, a RuntimeWarning says so once per
process, and the caller's recorder (the engine's stats) gets the kernel that actually ran and why.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .. import _compat
from .._compat import sdpa_kernels_used

__all__ = ["attend", "merge", "reference", "kernel_for", "sdpa_kernels_used", "Recorder"]

_NEG_INF = float("-inf")
# kernels that refuse some shapes or alignments by design: the reference runs instead, with a warning
_MAY_REFUSE = ("cuda-efficient",)
_warned: set[str] = set()

Recorder = Callable[[str, "str | None"], None]
"""``record(kernel, fallback)``: the kernel that ran (``cpu-flash``, ``cuda-flash``, ``cuda-efficient`` or
``math``) and, when it replaced the intended one, why."""


def kernel_for(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel :func:`attend` means to run for q of this device and dtype (without a key mask)."""
    if device.type == "cpu":
        return "cpu-flash"           # any float dtype, masks
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


def _run(q, k, v, causal: bool, mask: torch.Tensor | None, scale: float, record: Recorder | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    name, fallback = kernel_for(q.device, q.dtype), None
    if name == "cuda-flash" and mask is not None:
        name = "cuda-efficient"                  # FlashAttention takes no mask; this one takes a bias
    if name != "math":
        bias = mask
        if mask is not None and name == "cuda-efficient":
            # the memory-efficient kernel wants the additive bias at full size [B, H, L, S]
            bias = mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            out, lse = _compat.attention_with_lse(name, q, k, v, causal=causal, scale=scale, bias=bias)
        except _compat.CompatError:
            raise
        except RuntimeError as e:
            if name not in _MAY_REFUSE:
                raise
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            fallback = (f"{name} refused q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, "
                        f"mask {mask is not None}: {why}")
            if name not in _warned:
                _warned.add(name)
                warnings.warn(f"attention fell back to the matmul-softmax reference ({fallback}); "
                              "further fallbacks show in the engine stats only", RuntimeWarning, stacklevel=2)
            name = "math"
        else:
            if record is not None:
                record(name, None)
            return out, lse.to(_acc(q.dtype))
    if record is not None:
        record(name, fallback)
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
           key_len: torch.Tensor | None = None, record: Recorder | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k``/``v`` and its log-sum-exp (shapes: module docstring).

    causal: square causal attention (L == S); padding must be at the end of each row (right padding), where no
        real query can see it.
    key_len: optional [B] count of valid keys per batch entry (non-causal only); keys past it are masked out
        (they get weight 0, so they must be finite: 0 * nan is nan).
    record: called with the kernel that actually ran (see :data:`Recorder`).
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
        return _run(q, k, v, True, None, scale, record)
    out, lse = _run(_fold_heads(q, hkv), k, v, False, mask, scale, record)
    return out.reshape(B, H, L, D), lse.reshape(B, H, L)


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two key sets from the two partial results (o [.., L, D], lse [.., L]):
    the merged (o, lse), so further key sets can be merged in."""
    lse = torch.logaddexp(lse1, lse2)
    w1, w2 = (lse1 - lse).exp()[..., None], (lse2 - lse).exp()[..., None]
    acc = _acc(o1.dtype)
    return (o1.to(acc) * w1 + o2.to(acc) * w2).to(o1.dtype), lse
