"""MeZO across processes, decided once at construction: FSDP2's state around the weight writes, which ranks average
the loss (the loss group), and the start check that every rank runs the same optimizer.

- **FSDP2.** ``fully_shard`` all-gathers a module's shards before its forward and, by default, leaves the *root*
  module unsharded afterwards (its parameters then read as plain full tensors, the all-gathered copy, which the
  next forward reuses without gathering again). A perturbation or update written to the shards would then be
  invisible to it. So MeZO finds the ``FSDPModule`` s in ``model=``, calls ``reshard()`` on each (local, no
  communication; a no-op for a sharded module) before it reads the parameters and before every weight write: the
  next forward gathers the written shards. Virtual perturbation is refused there: FSDP2 hands the forward an
  all-gathered tensor that no module hook of MeZO's sees.
- **The loss group** (``MeZO(loss_group=...)``): the ranks whose closure losses are averaged, one all-reduce of
  the (L+, L-) pair per direction, so that every rank steps with the same g. ``None`` (default): no reduction
  without a process group; for plain tensors the world (data parallelism with replicated weights); for DTensors
  the data-parallel ranks of their mesh: FSDP2's mesh when FSDP2 manages them, otherwise the mesh dims over which
  every parameter is replicated. A pure tensor-parallel mesh has none: its ranks see the same batch and their
  forward ends in an all-reduce, so each rank's loss already is the loss; averaging over the world there would at
  best repeat it and, with a loss computed in parallel pieces, be wrong. ``False``: the caller reduces (the CLI
  exchanges per-example losses itself). A ``ProcessGroup``: that group.
- **The start check**: one ``all_gather_object`` of ``(seed, config, parameter shapes)`` over the ranks of the run
  (the DTensors' mesh; for plain tensors the loss group or the world); a difference is a ValueError naming the
  ranks, raised on every rank.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import _compat
from .dtensor import ShardedLayout

__all__ = ["fsdp_modules", "check_owned", "loss_group_for", "check_group_for", "check_same", "LossMean",
           "Prepare"]
_GROUPS: dict[tuple, object] = {}


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def fsdp_modules(model: object, perturb: str) -> list[nn.Module]:
    """The FSDP2 modules of ``model``, resharded (so its parameters read as their shards); ValueError for
    ``perturb="virtual"`` when there is one."""
    mods = _compat.fsdp_modules(model) if isinstance(model, nn.Module) else []
    if mods and perturb == "virtual":
        raise ValueError("perturb='virtual' cannot serve FSDP2 (fully_shard) modules: FSDP2 all-gathers a sharded "
                         "parameter into a new tensor outside the module's own forward hooks, so the forward would "
                         "never see the perturbed shard; use perturb='inplace' (with fp32 masters, sharded like the "
                         "weights)")
    for m in mods:
        m.reshard()
    return mods


def check_owned(model: object, names: Sequence[str], tensors: Sequence[torch.Tensor], fsdp: bool) -> None:
    """ValueError unless DTensor parameters come with ``model=``, and, under FSDP2, every tensor is a parameter of
    ``model`` as it stands sharded (a tensor read while FSDP2 had its module unsharded is an all-gathered copy)."""
    if not isinstance(model, nn.Module):
        raise ValueError("MeZO over DTensor parameters needs model= (the module tree that owns them): it finds "
                         "FSDP2's modules there, to keep what their forward sees in step with the shards it writes")
    if fsdp:
        owned = {id(p) for p in model.parameters()}
        bad = [n for n, t in zip(names, tensors) if id(t) not in owned]
        if bad:
            raise ValueError(f"{bad[0]} ({len(bad)} tensor(s) in all) is not a parameter of model as FSDP2 "
                             "registers it sharded: it was read while FSDP2 had its module unsharded (after a "
                             "forward), so it is the all-gathered copy that FSDP2 frees; pass model.parameters() "
                             "(MeZO reshards before reading them) or call reshard() on the FSDP modules first")


def _group(mesh, dims: Sequence[int]):
    """This rank's process group along mesh dims ``dims`` (one dim: the mesh's own; several: made once per set
    of ranks by ``new_subgroups_by_enumeration``, which every rank calls in the same order)."""
    dims = list(dims)
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    ranks = mesh.mesh.permute(*[d for d in range(mesh.ndim) if d not in dims], *dims)
    rows = tuple(tuple(r) for r in ranks.reshape(-1, ranks[(0,) * (mesh.ndim - len(dims))].numel()).tolist())
    key = (id(dist.group.WORLD), rows)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_subgroups_by_enumeration([list(r) for r in rows])[0]
    return _GROUPS[key]


def _replicated_dims(layout: ShardedLayout) -> list[int]:
    """The dims of the root mesh over which every DTensor is replicated (a DTensor on a slice of the root mesh is
    replicated over the dims outside it)."""
    root = layout.root
    rep = [True] * root.ndim
    for t in layout.wrappers:
        mesh = t.device_mesh
        if mesh == root:
            dims = list(range(root.ndim))
        else:
            names, root_names = mesh.mesh_dim_names, root.mesh_dim_names or ()
            if not names or any(n not in root_names for n in names):
                raise ValueError(f"cannot tell which dims of {root} the mesh {mesh} spans: pass loss_group= (the "
                                 "data-parallel group, or False)")
            dims = [root_names.index(n) for n in names]
        for k, p in enumerate(t.placements):
            if _compat.placement_kind(p)[0] != "replicate":
                rep[dims[k]] = False
    return [d for d, r in enumerate(rep) if r]


def loss_group_for(loss_group: object, layout: ShardedLayout | None, fsdp: Sequence[nn.Module]):
    """The group whose losses are averaged, or None for no reduction (module docstring)."""
    if loss_group is False:
        return None
    if loss_group is not None:
        if isinstance(loss_group, bool) or not (dist.is_available() and isinstance(loss_group, dist.ProcessGroup)):
            raise TypeError(f"loss_group must be None, False or a torch.distributed ProcessGroup, got "
                            f"{loss_group!r}")
        return loss_group if loss_group.size() > 1 else None
    if not _initialized():
        return None
    if layout is None or layout.root is None:
        group = dist.group.WORLD
    elif fsdp:
        meshes = [m for m in map(_compat.fsdp_dp_mesh, fsdp) if m is not None]
        group = _group(meshes[0], range(meshes[0].ndim)) if meshes else None
    else:
        dims = _replicated_dims(layout)
        group = _group(layout.root, dims) if dims else None
    return group if group is not None and dist.get_world_size(group) > 1 else None


def check_group_for(loss_group: object, layout: ShardedLayout | None):
    """The ranks the start check compares: the DTensors' root mesh, else the given group, else the world."""
    if not _initialized():
        return None
    if layout is not None and layout.root is not None:
        root = layout.root
        return dist.group.WORLD if root.size() == dist.get_world_size() else _group(root, range(root.ndim))
    return loss_group if dist.is_available() and isinstance(loss_group, dist.ProcessGroup) else dist.group.WORLD


def check_same(group, seed: int, config: dict, shapes: Sequence) -> None:
    """ValueError on every rank unless every rank of ``group`` has the same seed, config (its explicit bases left
    out: hand-made shards differ there) and parameter shapes; one ``all_gather_object``."""
    if group is None or dist.get_world_size(group) == 1:
        return
    cfg = {k: v for k, v in config.items() if k != "bases"}
    mine = {"seed": seed, "config": json.dumps(cfg, sort_keys=True, default=str),
            "shapes": hashlib.sha256(repr(list(shapes)).encode()).hexdigest()[:16], "n": len(shapes)}
    got: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, mine, group=group)
    ranks = dist.get_process_group_ranks(group)
    ref = got[0]
    for key, what in (("seed", "seed"), ("config", "config"), ("shapes", "parameter shapes")):
        bad = [ranks[i] for i, g in enumerate(got) if g[key] != ref[key]]
        if not bad:
            continue
        if key == "seed":
            detail = ", ".join(f"rank {ranks[i]}: {g['seed']}" for i, g in enumerate(got))
        elif key == "config":
            a, b = json.loads(ref["config"]), json.loads(got[ranks.index(bad[0])]["config"])
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            detail = f"rank {ranks[0]}: {{{', '.join(f'{k}={a.get(k)!r}' for k in diff)}}}; rank {bad[0]}: " \
                     f"{{{', '.join(f'{k}={b.get(k)!r}' for k in diff)}}}"
        else:
            detail = ", ".join(f"rank {ranks[i]}: {g['n']} tensors, shapes digest {g['shapes']}"
                               for i, g in enumerate(got))
        raise ValueError(f"rank(s) {bad} build MeZO with another {what} than rank {ranks[0]} ({detail}); every "
                         "rank must run the same optimizer over the same (global) parameter shapes")


class LossMean:
    """``values`` (floats) averaged over ``group`` in one all-reduce (float64, on the CPU unless the group is
    NCCL's); every rank gets the same bits."""

    def __init__(self, group):
        self.group, self.size = group, dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def __call__(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return (t / self.size).tolist()


class Prepare:
    """Called before every weight write of a sharded run: reshard the FSDP2 modules, bump the DTensors' version
    counters (the kernels write their local tensors through raw pointers)."""

    def __init__(self, fsdp: Sequence[nn.Module], wrappers: Sequence[torch.Tensor]):
        self.fsdp, self.wrappers = list(fsdp), list(wrappers)

    def __call__(self) -> None:
        for m in self.fsdp:
            m.reshard()
        if self.wrappers:
            _compat.bump_version(self.wrappers)


def reduce_fn(group) -> Callable[[Sequence[float]], list[float]] | None:
    return LossMean(group) if group is not None else None
