"""Torch: a parameter's version counter and swapping a module's parameter; the package's CompatError (part of
:mod:`mezo_kernels._compat`)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class CompatError(RuntimeError):
    """A library returned something other than what this package relies on: an upgrade changed its behaviour."""


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
