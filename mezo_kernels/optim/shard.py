"""Shard bases: a rank holding a row or column shard of a parameter perturbs it with the *global* element indices
of the unsharded parameter (``sharded_params`` computes the bases), so its z is exactly the single-process z.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import rng

__all__ = ["shard_range", "Shard", "sharded_params"]


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
        if s.dim == 0:
            params.append((s.name, t)); bases.append(base + s.start * _numel(full[1:]))
        else:
            cols = full[1]
            for r in range(full[0]):
                params.append((f"{s.name}[row {r}]", t[r:r + 1])); bases.append(base + r * cols + s.start)
    return params, bases


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
