"""Public fused-perturbation API: ``ParamSet`` (checked once, tables cached) and ``fill_normal_``.

A ``ParamSet`` holds an ordered list of tensors on one device. Tensor t gets the global base ``bases[t]`` (by
default the spec's running sum, each base rounded up to a multiple of 4), so element i sees ``z[bases[t] + i]``
whatever the grouping, dtype or backend. Tensors are grouped by dtype; each group gets a device-resident plan
(pointer/numel/base tables plus a (tensor, chunk) table) built once, so a call sends only ``(seed, alpha, beta)``
and makes one launch per group.

Exact restore: fp16/bf16 groups keep an fp32 master copy by default. The visible weights are then always
``round(master + s*z)``, so +eps, -eps, restore brings back the same bits every time (plain in-place mode drifts:
theta + eps*z - 2*eps*z + eps*z != theta after rounding).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence, Union

import torch
from torch.autograd.graph import increment_version

from . import dispatch as _bk
from . import rng

TensorLike = Union[torch.Tensor, tuple]
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _Group:
    """Tensors of one dtype: the plan every backend reads (see ``dispatch.Group``)."""

    def __init__(self, tensors: list[torch.Tensor], bases: list[int], masters: list[torch.Tensor] | None):
        self.tensors, self.bases, self.masters = tensors, bases, masters
        self.dtype, self.device = tensors[0].dtype, tensors[0].device
        self.aligned = all(b % 4 == 0 for b in bases)   # every tensor starts on a Philox counter: fast path
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``meta`` [4, T] int64 and ``chunks`` [C, 2] int64 on the group's device, built once per chunk size."""
        if chunk not in self._tables:
            numels = torch.tensor([t.numel() for t in self.tensors], dtype=torch.int64)
            masters = self.masters or [None] * len(self.tensors)
            meta = torch.tensor([[t.data_ptr() for t in self.tensors], numels.tolist(), self.bases,
                                 [0 if m is None else m.data_ptr() for m in masters]], dtype=torch.int64)
            counts = (numels + chunk - 1) // chunk
            tid = torch.repeat_interleave(torch.arange(len(self.tensors)), counts)
            first = torch.cumsum(counts, 0) - counts
            start = (torch.arange(int(counts.sum())) - first[tid]) * chunk
            chunks = torch.stack((tid, start), dim=1).contiguous()
            self._tables[chunk] = (meta.to(self.device), chunks.to(self.device))
        return self._tables[chunk]


def split_named(params: Iterable[TensorLike]) -> tuple[list[str], list[torch.Tensor]]:
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


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _bk.DTYPE_CODES:
        raise TypeError(f"{name}: unsupported dtype {t.dtype}; expected float32, float16 or bfloat16")
    if not t.is_contiguous():
        raise ValueError(f"{name}: tensor is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                         "pass .contiguous() storage: the kernels walk flat memory")


class ParamSet:
    """An ordered set of tensors updated in place by the fused seeded kernels.

    Args:
        params: tensors (fp32/fp16/bf16, contiguous, one device) or ``(name, tensor)`` pairs.
        bases: explicit global base index per tensor (ints >= 0), e.g. so a shard reproduces the unsharded z.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``; ``$MEZO_BACKEND`` overrides it.
        exact_restore: keep fp32 masters so restore is bit-exact. ``None`` (default): for fp16/bf16 groups only;
            ``True``: every group; ``False``: none (plain in-place arithmetic, which drifts).
        require_grad: raise if a tensor has ``requires_grad=False`` (for optimizers handed trainable params).
    """

    def __init__(self, params: Iterable[TensorLike], bases: Sequence[int] | None = None, backend: str = "auto",
                 exact_restore: bool | None = None, require_grad: bool = False):
        self.names, self._tensors = split_named(params)
        if bases is not None:
            bases = list(bases)
            if len(bases) != len(self._tensors):
                raise ValueError(f"bases has {len(bases)} entries for {len(self._tensors)} tensors")
            for b in bases:
                if isinstance(b, bool) or not isinstance(b, int) or b < 0 or b >= 2**62:
                    raise ValueError(f"bases must be ints in [0, 2**62), got {b!r}")
        self._explicit_bases = bases
        self._backend_arg, self._exact, self._require_grad = backend, exact_restore, require_grad
        self._active: tuple[int, float] | None = None   # (seed, offset): weights are theta + offset * z(seed)
        self.version = 0                                 # bumped by every operation that writes the weights
        self.launches = 0                                # kernel launches (one per group per operation)
        self._build()

    # ------------------------------------------------------------------------------------------- building
    def _build(self) -> None:
        tensors = self._tensors
        for name, t in zip(self.names, tensors):
            _check_tensor(name, t)
            if self._require_grad and not t.requires_grad:
                raise ValueError(f"{name}: requires_grad is False; pass only the trainable parameters")
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"mixed devices {sorted(map(str, devices))}: use one ParamSet per device")
        ptrs = [t.data_ptr() for t in tensors if t.numel()]
        if len(set(ptrs)) != len(ptrs):
            raise ValueError("the same storage appears twice in the parameter list: it would be perturbed twice")
        self.device = tensors[0].device
        self.bases = self._explicit_bases or rng.default_bases(t.numel() for t in tensors)
        self._backend = _bk.resolve(self._backend_arg, self.device)
        order: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel():
                order.setdefault(t.dtype, []).append(i)
        self._groups = []
        for dtype, idx in order.items():
            exact = self._exact if self._exact is not None else dtype in _LOW_PRECISION
            ts = [tensors[i].detach() for i in idx]
            masters = [t.float().clone() for t in ts] if exact else None
            self._groups.append(_Group(ts, [self.bases[i] for i in idx], masters))
        self._ptrs = [t.data_ptr() for t in tensors]

    def _check_storage(self) -> None:
        """Rebuild when a tensor's storage was replaced (``p.data = ...``); refuse mid-perturbation."""
        if [t.data_ptr() for t in self._tensors] != self._ptrs:
            if self._active is not None:
                raise RuntimeError("a tensor's storage was replaced while the set was perturbed; "
                                   "restore before swapping weights")
            self._build()

    # ------------------------------------------------------------------------------------------- properties
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def tensors(self) -> list[torch.Tensor]:
        return list(self._tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self._tensors)

    @property
    def exact_restore(self) -> bool:
        return any(g.masters is not None for g in self._groups)

    @property
    def perturbation(self) -> tuple[int, float] | None:
        """``(seed, offset)`` while the weights are theta + offset*z(seed), else None."""
        return self._active

    def masters(self) -> list[torch.Tensor | None]:
        """The fp32 master copy of each tensor (None where the group has none)."""
        out: dict[int, torch.Tensor] = {}
        for g in self._groups:
            for t, m in zip(g.tensors, g.masters or [None] * len(g.tensors)):
                out[t.data_ptr()] = m
        return [out.get(t.data_ptr()) for t in self._tensors]

    # ------------------------------------------------------------------------------------------- operations
    def _run(self, seed: int, plain: tuple[float, float], master: tuple[float, float, float], master_mode: int) -> None:
        """One launch per group: plain groups get AXPBY(alpha, beta); master groups ``master_mode`` with
        (alpha, beta, gamma) -- the two differ because masters are never perturbed."""
        for g in self._groups:
            if g.masters:
                self._backend.launch(g, seed, *master, master_mode)
            else:
                self._backend.launch(g, seed, plain[0], plain[1], 0.0, _bk.AXPBY)
            # the kernels write through raw pointers, which PyTorch cannot see: bump each tensor's version
            # counter as an in-place op would, so version-keyed caches (the forward engine's) never go stale
            increment_version(g.tensors)
            self.launches += 1
        self.version += 1

    def _prepare(self, seed: int) -> int:
        seed = rng.check_seed(seed)
        self._check_storage()
        return seed

    def axpby_(self, seed: int, alpha: float, beta: float) -> "ParamSet":
        """theta <- alpha*theta + beta*z(seed) on every tensor (on the masters in exact mode). Not mid-perturbation."""
        seed = self._prepare(seed)
        if self._active is not None:
            raise RuntimeError(f"axpby_ while perturbed by seed {self._active[0]}: restore_() first")
        ab = (float(alpha), float(beta))
        self._run(seed, ab, (*ab, 0.0), _bk.MASTER_UPDATE)
        return self

    def perturb_(self, seed: int, offset: float) -> "ParamSet":
        """Make the weights theta + offset*z(seed). Offsets are absolute: +eps then -eps is the MeZO pair."""
        seed = self._prepare(seed)
        cur = 0.0
        if self._active is not None:
            if self._active[0] != seed:
                raise RuntimeError(f"perturbed by seed {self._active[0]}, not {seed}: restore_() first")
            cur = self._active[1]
        self._run(seed, (1.0, float(offset) - cur), (1.0, 0.0, float(offset)), _bk.MASTER_VIEW)
        self._active = (seed, float(offset))
        return self

    def restore_(self) -> "ParamSet":
        """Undo the active perturbation (bit-exact in exact mode). A no-op when none is active."""
        if self._active is not None:
            seed, cur = self._active
            self._check_storage()
            self._run(seed, (1.0, -cur), (1.0, 0.0, 0.0), _bk.MASTER_VIEW)
            self._active = None
        return self

    def restore_update_(self, seed: int, lr: float, grad: float, weight_decay: float = 0.0) -> "ParamSet":
        """One fused pass: restore theta, then theta <- (1 - lr*wd)*theta - lr*grad*z(seed)."""
        seed = self._prepare(seed)
        cur = 0.0
        if self._active is not None:
            if self._active[0] != seed:
                raise RuntimeError(f"perturbed by seed {self._active[0]}, not {seed}")
            cur = self._active[1]
        alpha = 1.0 - float(lr) * float(weight_decay)
        step = -float(lr) * float(grad)
        self._run(seed, (alpha, -alpha * cur + step), (alpha, step, 0.0), _bk.MASTER_UPDATE)
        self._active = None
        return self

    @contextlib.contextmanager
    def perturbed(self, seed: int, offset: float) -> Iterator["ParamSet"]:
        """``with ps.perturbed(seed, eps): loss = f()`` — the weights are restored even if f raises."""
        self.perturb_(seed, offset)
        try:
            yield self
        finally:
            self.restore_()

    def resync_(self) -> "ParamSet":
        """Re-read fp32 masters from the visible weights (after loading new weights into them)."""
        if self._active is not None:
            raise RuntimeError("resync_ while perturbed: restore_() first")
        self._build()
        return self

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.dtype}x{len(g.tensors)}{'+master' if g.masters else ''}" for g in self._groups)
        return f"ParamSet({len(self._tensors)} tensors, {self.numel} elements, {groups}, backend={self.backend})"


def fill_normal_(t: torch.Tensor, seed: int, base: int = 0, backend: str = "auto") -> torch.Tensor:
    """Write ``t[i] = z(seed, base + i)`` (flat order), rounded once to t's dtype. Returns ``t``.

    ``t``: contiguous float32/float16/bfloat16 tensor on any device; ``base``: int >= 0."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fill_normal_ expects a torch.Tensor, got {type(t).__name__}")
    _check_tensor("fill_normal_ target", t)
    seed = rng.check_seed(seed)
    if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base < 2**62:
        raise ValueError(f"base must be an int in [0, 2**62), got {base!r}")
    if t.numel() == 0:
        return t
    g = _Group([t.detach()], [base], None)
    _bk.resolve(backend, t.device).launch(g, seed, 0.0, 1.0, 0.0, _bk.FILL)
    return t
