"""Shard bases: a rank holding a block of a parameter perturbs it with the *global* element indices of the
unsharded parameter, so its z is exactly the single-process z. :func:`local_runs` maps any block (a slice of every
dim, as a DTensor's local tensor is) to the runs of consecutive global indices it holds; ``sharded_params`` uses it
for hand-made row and column shards, ``optim.dtensor`` for DTensor parameters.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import rng

__all__ = ["shard_range", "Shard", "sharded_params", "local_runs"]


def local_runs(full_shape: Sequence[int], local_shape: Sequence[int], offset: Sequence[int]
               ) -> list[tuple[int, int, int]]:
    """The block ``offset[d] : offset[d] + local_shape[d]`` (every dim) of a row-major tensor of ``full_shape`` as
    runs of consecutive global flat indices: ``(local flat start, length, global flat start)`` in local order,
    which covers the (contiguous) local tensor once. With d the last dim where the block is narrower than the
    tensor, there are ``prod(local_shape[:d])`` runs of ``local_shape[d] * prod(full_shape[d+1:])`` elements; a
    whole tensor is one run; an empty block none."""
    full = [int(x) for x in full_shape]
    shape, off = [int(x) for x in local_shape], [int(x) for x in offset]
    if len(shape) != len(full) or len(off) != len(full):
        raise ValueError(f"block of rank {len(shape)} (offset rank {len(off)}) in a tensor of rank {len(full)}")
    if any(o < 0 or o + n > f for o, n, f in zip(off, shape, full)):
        raise ValueError(f"block {shape} at {off} lies outside shape {full}")
    if 0 in shape:
        return []
    partial = [d for d in range(len(full)) if shape[d] != full[d]]
    if not partial:
        return [(0, _numel(full), 0)]
    d = partial[-1]
    stride = [_numel(full[k + 1:]) for k in range(len(full))]
    length = shape[d] * stride[d]
    out, start = [], 0
    for idx in itertools.product(*(range(n) for n in shape[:d])):
        g = sum((off[k] + i) * stride[k] for k, i in enumerate(idx)) + off[d] * stride[d]
        out.append((start, length, g))
        start += length
    return out


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s part of ``size`` rows (``torch.tensor_split`` sizes: the first
    ``size % world_size`` ranks get one more)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    q, r = divmod(size, world_size)
    start = rank * q + min(rank, r)
    return start, start + q + (rank < r)


@dataclass(frozen=True)
class Shard:
    """One trainable parameter as this rank holds it.

    ``tensor``: the local piece (contiguous); ``full_shape``: the unsharded shape; ``dim``: None (replicated:
    the whole tensor), 0 (rows ``start:start+n`` of any tensor) or 1 (columns ``start:start+n`` of a 2-d weight).
    """
    name: str
    tensor: torch.Tensor
    full_shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0


def sharded_params(shards: Sequence[Shard]) -> tuple[list[tuple[str, torch.Tensor]], list[int]]:
    """``(params, bases)`` for ``MeZO(params, bases=bases)`` so that every local element gets the z of its global
    index in the *unsharded* parameter list (the list's order is the unsharded ``trainable_parameters`` order).

    A row shard of a contiguous tensor is one contiguous range of the flat parameter: one entry, base
    ``base + start * row_numel``. A column shard is not contiguous in the unsharded flat order, so it becomes one
    entry per row (a ``[1, n]`` view, still 2-d so weight decay treats it as a matrix), base
    ``base + row * cols + start``. Bases need not be multiples of 4.
    """
    full_bases = rng.default_bases(_numel(s.full_shape) for s in shards)
    params: list[tuple[str, torch.Tensor]] = []
    bases: list[int] = []
    for s, base in zip(shards, full_bases):
        t, full = s.tensor, tuple(int(d) for d in s.full_shape)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{s.name}: shard tensor must be a torch.Tensor, got {type(t).__name__}")
        if s.dim is None:
            if tuple(t.shape) != full:
                raise ValueError(f"{s.name}: replicated tensor has shape {tuple(t.shape)}, expected {full}")
            params.append((s.name, t)); bases.append(base)
            continue
        if s.dim not in (0, 1) or (s.dim == 1 and len(full) != 2):
            raise ValueError(f"{s.name}: dim must be None, 0, or 1 for a 2-d weight; got dim={s.dim} for {full}")
        if t.dim() != len(full) or any(a != b for d, (a, b) in enumerate(zip(t.shape, full)) if d != s.dim):
            raise ValueError(f"{s.name}: shard shape {tuple(t.shape)} does not match full shape {full} "
                             f"outside dim {s.dim}")
        if s.start < 0 or s.start + t.shape[s.dim] > full[s.dim]:
            raise ValueError(f"{s.name}: shard [{s.start}, {s.start + t.shape[s.dim]}) of dim {s.dim} lies outside "
                             f"its size {full[s.dim]}")
        if not t.is_contiguous():
            raise ValueError(f"{s.name}: shard tensor must be contiguous")
        offset = [s.start if d == s.dim else 0 for d in range(len(full))]
        runs = local_runs(full, t.shape, offset)
        if s.dim == 0:
            params.append((s.name, t)); bases.append(base + (runs[0][2] if runs else 0))
        else:
            for r, (_, _, g) in enumerate(runs):
                params.append((f"{s.name}[row {r}]", t[r:r + 1])); bases.append(base + g)
    return params, bases


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
