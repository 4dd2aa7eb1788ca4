"""Group plans (what every backend reads, ``docs/kernel_abi.md``) and the single-tensor fills.

A plan is one dtype group of a parameter set: its tensors, their global bases, and what ``meta[3]`` points at
(fp32 masters, or for mode OUT the source tensors). ``fill_normal_`` / ``fill_sign_`` write one tensor from the
spec's Gaussian or sign stream.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch

from .. import _compat
from .. import kernels as _bk
from .. import rng
from ..rng import Distribution, KernelMode

TensorLike = Union[torch.Tensor, tuple]

__all__ = ["split_named", "fill_normal_", "fill_sign_"]


class _Group:
    """Tensors of one dtype: the plan every backend reads (see ``dispatch.Group``).

    ``masters`` (fp32, modes MASTER_*) or ``sources`` (the group's dtype, mode OUT) give ``meta[3]``."""

    def __init__(self, tensors: list[torch.Tensor], bases: list[int], masters: list[torch.Tensor] | None,
                 sources: list[torch.Tensor] | None = None):
        self.tensors, self.bases, self.masters, self.sources = tensors, bases, masters, sources
        ref = sources or tensors
        self.dtype, self.device = ref[0].dtype, ref[0].device
        self.aligned = all(b % 4 == 0 for b in bases)   # every tensor starts on a Philox counter: fast path
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ptrs = [t.data_ptr() for t in tensors]

    def tables(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``meta`` [4, T] int64 and ``chunks`` [C, 2] int64 on the group's device, built once per chunk size."""
        if chunk not in self._tables:
            numels = torch.tensor([t.numel() for t in self.tensors], dtype=torch.int64)
            row3 = self.sources or self.masters or [None] * len(self.tensors)
            meta = torch.tensor([self._ptrs, numels.tolist(), self.bases,
                                 [0 if m is None else m.data_ptr() for m in row3]], dtype=torch.int64)
            counts = (numels + chunk - 1) // chunk
            tid = torch.repeat_interleave(torch.arange(len(self.tensors)), counts)
            first = torch.cumsum(counts, 0) - counts
            start = (torch.arange(int(counts.sum())) - first[tid]) * chunk
            chunks = torch.stack((tid, start), dim=1).contiguous()
            self._tables[chunk] = (meta.to(self.device), chunks.to(self.device))
        return self._tables[chunk]

    def retarget(self, tensors: list[torch.Tensor]) -> None:
        """Point the plan at new destination tensors of the same numels (mode OUT writes a fresh buffer per call):
        the cached tables get their pointer row patched instead of being rebuilt."""
        ptrs = [t.data_ptr() for t in tensors]
        if ptrs != self._ptrs:
            row = torch.tensor(ptrs, dtype=torch.int64)
            if self.device.type == "cuda":
                row = row.pin_memory()   # a stream-ordered copy that does not stall the host
            for meta, _ in self._tables.values():
                meta[0].copy_(row, non_blocking=self.device.type == "cuda")
            self._ptrs = ptrs
        self.tensors = tensors

    def release(self) -> None:
        """Drop the references to the destinations (the tables keep only their addresses)."""
        self.tensors = []


def split_named(params: Iterable[TensorLike]) -> tuple[list[str], list[torch.Tensor]]:
    """``(names, tensors)`` from tensors or ``(name, tensor)`` pairs; unnamed tensors are called ``tensor[i]``.

    Raises TypeError for anything else and ValueError for an empty list."""
    names, tensors = [], []
    for i, p in enumerate(params):
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            name, p = p
        else:
            name = f"tensor[{i}]"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or a (name, tensor) pair, got {type(p).__name__}")
        names.append(name)
        tensors.append(p)
    if not tensors:
        raise ValueError("empty parameter list: ParamSet needs at least one tensor")
    return names, tensors


def check_tensor(name: str, t: torch.Tensor) -> None:
    """TypeError for a dtype the kernels lack or a DTensor, ValueError for non-contiguous storage."""
    if _compat.is_dtensor(t):
        raise TypeError(f"{name}: a DTensor; the kernels take plain tensors: pass its local shard with the global "
                        "base of its first element, or hand the DTensors to MeZO (optim.dtensor does that)")
    if t.dtype not in rng.DTYPE_CODES:
        raise TypeError(f"{name}: unsupported dtype {t.dtype}; expected float32, float16 or bfloat16")
    if not t.is_contiguous():
        raise ValueError(f"{name}: tensor is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                         "pass .contiguous() storage: the kernels walk flat memory")


def _fill(t: torch.Tensor, seed: int, base: int, backend: str, dist: Distribution, what: str) -> torch.Tensor:
    """The public fills' one body: the seed is checked here, once; ``dist`` is the spec's enum."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(t).__name__}")
    check_tensor(f"{what} target", t)
    seed = rng.check_seed(seed)
    if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base < 2**62:
        raise ValueError(f"base must be an int in [0, 2**62), got {base!r}")
    if t.numel() == 0:
        return t
    g = _Group([t.detach()], [base], None)
    _bk.choose(backend, t.device, KernelMode.FILL, dist).launch(g, seed, 0.0, 1.0, 0.0, KernelMode.FILL, dist)
    return t


def fill_normal_(t: torch.Tensor, seed: int, base: int = 0, backend: str = "auto") -> torch.Tensor:
    """Write ``t[i] = z(seed, base + i)`` (flat order), rounded once to t's dtype. Returns ``t``.

    ``t``: contiguous float32/float16/bfloat16 tensor on any device; ``base``: int >= 0."""
    return _fill(t, seed, base, backend, Distribution.GAUSSIAN, "fill_normal_")


def fill_sign_(t: torch.Tensor, seed: int, base: int = 0, backend: str = "auto") -> torch.Tensor:
    """Write the sign stream ``t[i] = +-1 = s(seed, base + i)`` (flat order; ``rng.signs``). Returns ``t``.

    ``t``: contiguous float32/float16/bfloat16 tensor on any device; ``base``: int >= 0. Exact in every dtype."""
    return _fill(t, seed, base, backend, Distribution.SIGN, "fill_sign_")
