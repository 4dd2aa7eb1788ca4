"""Torch.distributed: DTensor placements and blocks, FSDP2 modules and meshes (part of :mod:`mezo_kernels._compat`)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .tensors import CompatError


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
