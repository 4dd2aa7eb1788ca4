"""Layer-by-layer forward of a Llama-family causal LM with shared-prefix (cascade) attention.

Per layer the engine runs one batch per nesting level of shared segments (each segment's tokens, once), then the
batch of rows (each row's own tokens). An entry attends causally to its own tokens and, in place, to the K/V of every
segment above it; the partial attentions merge through their log-sum-exps (attention.py). Everything else is the
model's own modules (norms, projections with any peft LoRA wrapped in them, MLP, rotary embedding, LM head), taken
apart and called in ``LlamaDecoderLayer``'s order by ``_compat.llama_parts``, so the result equals the plain forward
up to the summation order inside attention.

Every batch is right padded. Hidden states are [entries, tokens, hidden]; K/V are [entries, Hkv, tokens, D] after
RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import _compat
from .attention import Recorder, attend, merge

SUPPORTED = ("llama",)


def sharded_reason(model: nn.Module) -> str | None:
    """Why the layer-by-layer runner must not run ``model``: its parameters are sharded (DTensor: FSDP2, tensor
    parallel) or a module is FSDP-wrapped. The runner calls the projections directly, so FSDP's per-module hooks
    (the all-gathers) would not fire and tensor parallelism changes the local head counts. None otherwise. The
    answer depends on the module tree only, which is the same on every rank of a job, so every rank takes the same
    path and issues the same collectives."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "sharded parameters (DTensor): plain forward"
    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        return "FSDP-wrapped modules: plain forward"
    return None


def unsupported_reason(lm: nn.Module) -> str | None:
    """None when :class:`LlamaRunner` can run ``lm`` (an unwrapped ``*ForCausalLM``), else why not."""
    sharded = sharded_reason(lm)
    if sharded:
        return sharded
    cfg = getattr(lm, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED:
        return f"model_type {mtype!r} (prefix/frozen-layer reuse supports {', '.join(SUPPORTED)})"
    missing = _compat.llama_missing(lm)
    if missing:
        return f"{type(lm).__name__} does not have the Llama module layout (missing {', '.join(missing)})"
    if lm.training and getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout is active (training mode)"
    return None


@dataclass
class GroupLayout:
    """Which entries of a batch attend to which segment of one nesting level.

    slots: [G * n] batch index of every (segment, member) slot; padding slots repeat a member and are dropped.
    valid: [G * n] bool, False for padding slots (None: no padding). targets: [M] batch index of each valid slot,
    in slot order. full: every batch entry, in order, is a target (no scatter needed).
    lengths: [G] segment length per group; uniform: their common length, or None. Keys past a group's length
    are masked, unless every length equals the K/V width: then no mask at all.
    """

    slots: torch.Tensor
    valid: torch.Tensor | None
    n: int
    targets: torch.Tensor
    full: bool
    lengths: torch.Tensor
    uniform: int | None

    @staticmethod
    def build(members: list[list[int]], lengths: list[int], batch: int, device: torch.device) -> "GroupLayout":
        """members[g]: the batch entries attending to segment g (the g-th entry of that level's K/V stack)."""
        n = max(len(m) for m in members)
        slots = [x for m in members for x in m + [m[0]] * (n - len(m))]
        flags = [f for m in members for f in [True] * len(m) + [False] * (n - len(m))]
        targets = [x for m in members for x in m]
        return GroupLayout(torch.tensor(slots, device=device),
                           None if all(flags) else torch.tensor(flags, device=device), n,
                           torch.tensor(targets, device=device), targets == list(range(batch)),
                           torch.tensor(lengths, device=device), lengths[0] if len(set(lengths)) == 1 else None)


class LlamaRunner:
    """Runs ``lm`` (an unwrapped Llama ``*ForCausalLM``; LoRA layers inside it are fine) one layer at a time.

    ``record`` (settable): told which attention kernel ran at each call (:data:`attention.Recorder`)."""

    def __init__(self, lm: nn.Module) -> None:
        why = unsupported_reason(lm)
        if why:
            raise ValueError(f"cannot run {type(lm).__name__} layer by layer: {why}")
        self.lm, self.parts = lm, _compat.llama_parts(lm)
        self.layers = self.parts.layers
        self.head_dim, self.scale = self.parts.parts[0].head_dim, self.parts.parts[0].scaling
        self.n_kv = lm.config.num_key_value_heads
        self.record: Recorder | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.parts.embed_tokens

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.parts.embed_tokens(ids)

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for ``positions`` [rows, tokens]."""
        return self.parts.rope(h, positions)

    def _qkv(self, i: int, x: torch.Tensor, rope, need_q: bool = True):
        a = self.parts.parts[i]
        B, L, _ = x.shape
        k = a.k_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        q = a.q_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2) if need_q else k
        q, k = _compat.apply_rope(q, k, *rope)
        return q, k, v

    def layer(self, i: int, h: torch.Tensor, rope, parts=(), kv_only: bool = False):
        """Layer i on a batch [B, T, hidden] (right padded). Each entry attends causally to its own tokens and to
        the segments in ``parts``: ``(k, v, layout)`` per nesting level, k/v [G, Hkv, P, D] of that level's
        segments. Returns (h_next, k, v); ``kv_only`` (last layer of a segment batch: nothing reads its output)
        stops after K/V."""
        x = self.parts.parts[i].input_norm(h)
        q, k, v = self._qkv(i, x, rope, need_q=not kv_only)
        if kv_only:
            return None, k, v
        o, lse = attend(q, k, v, causal=True, scale=self.scale, record=self.record)
        for pk, pv, layout in parts:
            o, lse = self._merge_part(q, o, lse, pk, pv, layout)
        B, _, L, _ = o.shape
        return self.parts.parts[i].finish(h, o.transpose(1, 2).reshape(B, L, -1)), k, v
    def _merge_part(self, q, o, lse, pk, pv, layout: GroupLayout):
        """Merge attention over one level's segment keys into the running (o, lse) of the entries below them.

        The queries of a segment's n entries and of the query heads sharing one KV head fold into one long query
        sequence per (segment, KV head): one kernel call for all segments, the segment K/V read in place."""
        G, hkv = pk.shape[0], pk.shape[1]
        _, H, S, D = q.shape
        rep, n = H // hkv, layout.n
        qg = q.index_select(0, layout.slots).view(G, n, hkv, rep, S, D).permute(0, 2, 3, 1, 4, 5)
        key_len = None if layout.uniform == pk.shape[2] else layout.lengths
        og, lg = attend(qg.reshape(G, hkv, rep * n * S, D), pk, pv, causal=False, scale=self.scale, key_len=key_len,
                        record=self.record)
        og = og.view(G, hkv, rep, n, S, D).permute(0, 3, 1, 2, 4, 5).reshape(G * n, H, S, D)
        lg = lg.view(G, hkv, rep, n, S).permute(0, 3, 1, 2, 4).reshape(G * n, H, S)
        if layout.valid is not None:
            og, lg = og[layout.valid], lg[layout.valid]
        if layout.full:
            return merge(o, lse, og, lg)
        t = layout.targets
        mo, ml = merge(o.index_select(0, t), lse.index_select(0, t), og, lg)
        return o.index_copy(0, t, mo), lse.index_copy(0, t, ml)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on selected hidden states [N, hidden] -> [N, V]."""
        return self.parts.lm_head(self.parts.norm(h))
