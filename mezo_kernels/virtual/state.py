"""Which stored tensors are perturbed *virtually* right now, and by what: a registry that readers of weights consult.

Virtual perturbation (``virtual.py``) never writes the stored weights, so their address and version counter do not
change between the +eps pass, the -eps pass and an unperturbed forward. Anything that caches results computed from
the weights (the forward engine) therefore keys them on :func:`key` as well: the active perturbation
``(seed, offset, distribution, base)`` of every tensor it depends on, or nothing for an unperturbed tensor, so a
frozen-only state stays shared by every pass.

Entries are keyed by the tensor's storage address (``data_ptr``): the Parameter object a module holds and the
tensor an optimizer was handed may be different Python objects over the same storage. This module imports no
kernels and no model code; it is a plain per-process table.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, NamedTuple

import torch

__all__ = ["Perturbation", "activated", "active", "perturbation_of", "key"]


class Perturbation(NamedTuple):
    """The virtual state of one tensor: it reads as ``round(theta + offset * z(seed, base + i))``, z drawn from
    ``distribution`` (``"gaussian"`` or ``"rademacher"``)."""

    seed: int
    offset: float        # s * eps: the sign and the scale together
    distribution: str
    base: int


_ACTIVE: dict[int, Perturbation] = {}


def perturbation_of(t: torch.Tensor) -> Perturbation | None:
    """The active virtual perturbation of ``t``'s storage, or None."""
    if not _ACTIVE or t.numel() == 0:
        return None
    return _ACTIVE.get(t.data_ptr())


def active() -> bool:
    """True while any tensor is virtually perturbed."""
    return bool(_ACTIVE)


def key(params: Iterable[torch.Tensor]) -> tuple:
    """``((position, Perturbation), ...)`` for the tensors of ``params`` that are perturbed now; ``()`` when none
    is (the common, unperturbed case costs one dict lookup per tensor at most)."""
    if not _ACTIVE:
        return ()
    out = []
    for i, p in enumerate(params):
        pert = perturbation_of(p)
        if pert is not None:
            out.append((i, pert))
    return tuple(out)


@contextlib.contextmanager
def activated(entries: dict[int, Perturbation]) -> Iterator[None]:
    """Register ``{data_ptr: Perturbation}`` for the duration of the block (removed even if the block raises).

    Raises ValueError when one of the storages is already perturbed (nesting two perturbations of one tensor has
    no meaning: theta + a*z1 + b*z2 is not what either caller would read)."""
    clash = [ptr for ptr in entries if ptr in _ACTIVE]
    if clash:
        raise ValueError(f"{len(clash)} tensor(s) are already virtually perturbed (seed "
                         f"{_ACTIVE[clash[0]].seed}); end that perturbation first")
    _ACTIVE.update(entries)
    try:
        yield
    finally:
        for ptr in entries:
            _ACTIVE.pop(ptr, None)
