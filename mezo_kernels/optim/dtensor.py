"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism's ``parallelize_module``, and both on a 2-d
mesh) as the kernels see them: runs of this rank's local tensor, each with the *global* index of its first element.

A parameter's base is the single-process base (``rng.default_bases`` over the full numels, in parameter order),
and its local tensor is a block of the full tensor (``_compat.dtensor_box``), which ``shard.local_runs`` cuts into
runs of consecutive global indices: one run for a ``Shard(0)`` block or a replicated tensor, one per row for a
``Shard(1)`` block of a matrix. Each run is one ``ParamSet`` entry (a view of the local tensor), so every rank
perturbs and updates only what it holds and draws exactly the z of a single-process run, in every mode.

Placements: ``Shard``, FSDP2's ``_StridedShard`` (a data-parallel shard of a TP shard) and ``Replicate``, mixed in
any way on the mesh dims: every rank updates the block it holds, and replicas of a block stay identical as long as
every rank steps with the same g (the default loss group sees to it, ``optim.distributed``). ``Partial`` is
refused: its local tensor is a summand of the weight, not a part of it. Plain tensors among DTensors are
replicated: the whole tensor on every rank, with the same base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import _compat
from .shard import local_runs

__all__ = ["Run", "ShardedLayout", "expand", "join_masters", "split_master"]

Run = tuple[str, torch.Tensor, int]          # (name, a contiguous view of the local tensor, global base)


@dataclass
class ShardedLayout:
    """``runs[i]``: tensor i's runs (none where this rank holds nothing of it); ``wrappers``: the DTensors (their
    version counters move with every write); ``root``: their common root mesh (None without a DTensor);
    ``locals[i]``: this rank's plain tensor of tensor i (the tensor itself when plain); ``is_dtensor[i]``."""

    runs: list[list[Run]]
    wrappers: list[torch.Tensor]
    root: object | None
    locals: list[torch.Tensor]
    is_dtensor: list[bool]

    @property
    def local_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in self.locals]


def _check_placements(name: str, t: torch.Tensor) -> None:
    mesh, placements = t.device_mesh, t.placements
    for k, p in enumerate(placements):
        kind, dim, split = _compat.placement_kind(p)
        if kind == "partial":
            raise ValueError(f"{name}: a Partial placement ({p}) on mesh dim {k}: its local tensor is a summand "
                             "of the weight, not a part of it, so it cannot be perturbed or updated; redistribute "
                             "it to Shard or Replicate first")
        if kind == "other":
            raise ValueError(f"{name}: unsupported placement {p!r} on mesh dim {k} (MeZO serves Shard, Replicate "
                             "and FSDP2's strided shard of a TP shard)")
        if kind == "strided":
            later = 1
            for j in range(k + 1, len(placements)):
                kj, dj, _ = _compat.placement_kind(placements[j])
                if kj in ("shard", "strided") and dj == dim:
                    later *= mesh.size(j)
            if later != split:
                raise ValueError(f"{name}: placement {p} on mesh dim {k} is not FSDP2's shard of a TP shard (split "
                                 f"factor {split}, later mesh dims shard dim {dim} {later} ways): its local rows "
                                 "are not one block of the tensor")


def expand(names: Sequence[str], tensors: Sequence[torch.Tensor], bases: Sequence[int]) -> ShardedLayout:
    """The runs of every tensor; ``bases``: the full tensors' bases. ValueError naming the tensor for a
    placement MeZO cannot serve, a mesh other than the others' (a different root mesh), a rank outside the mesh,
    or a local tensor that is not contiguous."""
    runs: list[list[Run]] = []
    wrappers, locals_, flags = [], [], []
    root, root_of = None, None
    for name, t, base in zip(names, tensors, bases):
        if not _compat.is_dtensor(t):
            flags.append(False)
            locals_.append(t)
            runs.append([(name, t, base)] if t.numel() else [])
            continue
        flags.append(True)
        _check_placements(name, t)
        r = _compat.root_mesh(t.device_mesh)
        if root is None:
            root, root_of = r, name
        elif r != root:
            raise ValueError(f"{name} lives on mesh {t.device_mesh}, {root_of} on a mesh of another device mesh "
                             f"({root}): MeZO needs every DTensor parameter on one mesh or its slices")
        box = _compat.dtensor_box(t)
        if not box.in_mesh:
            raise ValueError(f"{name}: this rank is not in its mesh {t.device_mesh}")
        local = box.local
        if not local.is_contiguous():
            raise ValueError(f"{name}: the local tensor is not contiguous (shape {tuple(local.shape)}, stride "
                             f"{local.stride()}); the kernels walk flat memory")
        cut = local_runs(box.global_shape, local.shape, box.offset)
        if len(cut) == 1:
            runs.append([(name, local, base + cut[0][2])])
        else:
            flat = local.view(-1)
            runs.append([(f"{name}[run {k}]", flat[a:a + n], base + g) for k, (a, n, g) in enumerate(cut)])
        wrappers.append(t)
        locals_.append(local)
    return ShardedLayout(runs, wrappers, root, locals_, flags)


def join_masters(masters: Sequence[torch.Tensor | None], local_shape: Sequence[int]) -> torch.Tensor | None:
    """One fp32 master of a DTensor's local tensor from its runs' masters (None when they have none)."""
    if not masters or all(m is None for m in masters):
        return None
    if len(masters) == 1:
        return masters[0].view(local_shape)
    return torch.cat([m.reshape(-1) for m in masters]).view(local_shape)


def split_master(master: torch.Tensor, runs: Sequence[Run]) -> list[torch.Tensor]:
    """``join_masters`` undone: the piece of a saved local master that each run's master holds."""
    flat, out, start = master.reshape(-1), [], 0
    for _, t, _ in runs:
        out.append(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return out
