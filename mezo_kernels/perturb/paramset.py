"""Public fused-perturbation API: ``ParamSet`` (checked once, tables cached); ``fill_normal_``, ``fill_sign_``.

A ``ParamSet`` holds an ordered list of tensors on one device. Tensor t gets the global base ``bases[t]`` (by
default the spec's running sum, each base rounded up to a multiple of 4), so element i sees ``z[bases[t] + i]``
whatever the grouping, dtype or backend. Tensors are grouped by dtype; each group gets a device-resident plan
(pointer/numel/base tables plus a (tensor, chunk) table) built once, so a call sends only ``(seed, alpha, beta)``
and makes one launch per group.

Exact restore: fp16/bf16 groups keep an fp32 master copy by default. The visible weights are then always
``round(master + s*z)``, so +eps, -eps, restore brings back the same bits every time (plain in-place mode drifts:
theta + eps*z - 2*eps*z + eps*z != theta after rounding).

Directions come from one distribution per set (``distribution="gaussian" | "rademacher"``; the spec's streams).
``perturbed_copy``/``perturbed_copies`` write theta + offset*z into other buffers without touching theta (kernel
mode OUT); ``update_(..., rounding="stochastic")`` rounds low-precision updates stochastically (mode AXPBY_SR).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch

from .. import _compat
from .. import kernels as _bk
from .. import rng
from .copy import Copier, check_index
from .lowrank_part import LowRankPart, check_draw, dense_seed
from .plan import TensorLike, _Group, check_tensor as _check_tensor, fill_normal_, fill_sign_, split_named
from ..rng import Distribution, KernelMode

__all__ = ["ParamSet", "fill_normal_", "fill_sign_", "split_named"]
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_ROUNDINGS = ("nearest", "stochastic")
# the modes a set launches on its weights, chosen when it is built; OUT and AXPBY_SR are chosen when first used
_CORE_MODES = (KernelMode.AXPBY, KernelMode.MASTER_UPDATE, KernelMode.MASTER_VIEW)


class ParamSet:
    """An ordered set of tensors updated in place by the fused seeded kernels.

    Args:
        params: tensors (fp32/fp16/bf16, contiguous, one device) or ``(name, tensor)`` pairs.
        bases: explicit global base index per tensor (ints >= 0), e.g. so a shard reproduces the unsharded z.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``; ``$MEZO_BACKEND`` overrides it.
        exact_restore: keep fp32 masters so restore is bit-exact. ``None`` (default): for fp16/bf16 groups only;
            ``True``: every group; ``False``: none (plain in-place arithmetic, which drifts).
        require_grad: raise if a tensor has ``requires_grad=False`` (for optimizers handed trainable params).
        distribution: ``"gaussian"`` (default) or ``"rademacher"`` (+-1 signs): the z of every operation.
        lowrank_r: rank r of low-rank directions (``perturb.lowrank_part``): 2-d tensors with r*(m + n) < m*n get
            z = U Vᵀ/sqrt(r), the others the dense Gaussian (``distribution`` must then be gaussian). A seed may
            then be a pair ``(seed_u, seed_v)``. None: dense directions everywhere.
        blocks: with ``lowrank_r``, per tensor the full tensor's ``(base, (M, N))`` when the tensor is a run of a
            shard (``optim.dtensor``), else None; None: every tensor is whole.
    """

    def __init__(self, params: Iterable[TensorLike], bases: Sequence[int] | None = None, backend: str = "auto",
                 exact_restore: bool | None = None, require_grad: bool = False, distribution: str = "gaussian",
                 lowrank_r: int | None = None, blocks: Sequence | None = None):
        self._dist = rng.distribution_code(distribution)
        if lowrank_r is not None and self._dist != Distribution.GAUSSIAN:
            raise ValueError(f"lowrank_r draws Gaussian factors; it does not combine with distribution "
                             f"{self._dist.label!r}")
        self._lowrank_r, self._blocks = lowrank_r, blocks
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
        self._kernels: dict[KernelMode, object] = {}         # kernels.choose's answers for this set, per mode
        for mode in _CORE_MODES:
            self.backend_for(mode)
        self._lowrank = None if self._lowrank_r is None else LowRankPart(
            self.names, tensors, self.bases, self._lowrank_r, self._backend_arg, self._exact, self._blocks)
        order: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel() and not (self._lowrank is not None and self._lowrank.covers(i)):
                order.setdefault(t.dtype, []).append(i)
        self._groups = []
        for dtype, idx in order.items():
            exact = self._exact if self._exact is not None else dtype in _LOW_PRECISION
            ts = [tensors[i].detach() for i in idx]
            masters = [t.float().clone() for t in ts] if exact else None
            self._groups.append(_Group(ts, [self.bases[i] for i in idx], masters))
        self._group_index = list(order.values())             # tensor indices of each group, in group order
        self._ptrs = [t.data_ptr() for t in tensors]
        self._copier = Copier(self.names, tensors, self.bases, self._groups, self._group_index, self._dist)

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
        """The name of the backend that runs the set's in-place operations."""
        return self._kernels[KernelMode.AXPBY].name

    @property
    def tensors(self) -> list[torch.Tensor]:
        return list(self._tensors)

    @property
    def distribution(self) -> str:
        """``"gaussian"`` or ``"rademacher"``: the stream every operation of this set draws z from."""
        return self._dist.label

    @property
    def dist(self) -> Distribution:
        """The set's distribution as the spec's enum (parsed once, when the set was built)."""
        return self._dist

    @property
    def lowrank(self) -> LowRankPart | None:
        """The low-rank entries (``lowrank_r`` given), else None."""
        return self._lowrank

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self._tensors)

    @property
    def exact_restore(self) -> bool:
        return any(g.masters is not None for g in self._groups) or bool(self._lowrank and self._lowrank.masters())

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
        low = self._lowrank.masters() if self._lowrank is not None else {}
        return [low[i].view(t.shape) if i in low else out.get(t.data_ptr()) for i, t in enumerate(self._tensors)]

    # ------------------------------------------------------------------------------------------- operations
    def backend_for(self, mode: KernelMode):
        """The backend object that runs kernel ``mode`` on this set: ``kernels.choose``'s answer for the set's
        backend argument, device and distribution, asked once per mode (ValueError when a named backend cannot)."""
        found = self._kernels.get(mode)
        if found is None:
            found = self._kernels[mode] = _bk.choose(self._backend_arg, self.device, mode, self._dist)
        return found

    def _run(self, seed: int, plain: tuple[float, float], master: tuple[float, float, float],
             master_mode: KernelMode, stochastic: bool = False) -> None:
        """One launch per group: plain groups get AXPBY(alpha, beta) (AXPBY_SR for fp16/bf16 when ``stochastic``);
        master groups ``master_mode`` with (alpha, beta, gamma) -- they differ because masters are never perturbed.
        ``seed``: an int, or with ``lowrank_r`` a pair (the dense groups draw from its seed_u)."""
        if self._lowrank is not None:
            self._lowrank.run(seed, plain, master, master_mode, stochastic)
            _compat.bump_version([e.w for e in self._lowrank.entries])
            self.launches += len(self._lowrank.entries)
            seed = dense_seed(seed)
        for g in self._groups:
            if g.masters:
                self.backend_for(master_mode).launch(g, seed, *master, master_mode, self._dist)
            else:
                mode = KernelMode.AXPBY_SR if stochastic and g.dtype in _LOW_PRECISION else KernelMode.AXPBY
                self.backend_for(mode).launch(g, seed, plain[0], plain[1], 0.0, mode, self._dist)
            # the kernels write through raw pointers, which PyTorch cannot see: bump each tensor's version
            # counter as an in-place op would, so version-keyed caches (the forward engine's) never go stale
            _compat.bump_version(g.tensors)
            self.launches += 1
        self.version += 1

    def _check_draw(self, seed: object):
        """A seed checked (``rng.check_seed``), or with ``lowrank_r`` also a ``(seed_u, seed_v)`` pair."""
        return check_draw(seed) if self._lowrank is not None else rng.check_seed(seed)

    def _prepare(self, seed: int) -> int:
        """The one check of a public call's seed (``rng.check_seed``; a pair with ``lowrank_r``); then the storage
        check."""
        seed = self._check_draw(seed)
        self._check_storage()
        return seed

    def axpby_(self, seed: int, alpha: float, beta: float) -> "ParamSet":
        """theta <- alpha*theta + beta*z(seed) on every tensor (on the masters in exact mode). Not mid-perturbation."""
        seed = self._prepare(seed)
        if self._active is not None:
            raise RuntimeError(f"axpby_ while perturbed by seed {self._active[0]}: restore_() first")
        ab = (float(alpha), float(beta))
        self._run(seed, ab, (*ab, 0.0), KernelMode.MASTER_UPDATE)
        return self

    def perturb_(self, seed: int, offset: float) -> "ParamSet":
        """Make the weights theta + offset*z(seed). Offsets are absolute: +eps then -eps is the MeZO pair."""
        seed = self._prepare(seed)
        cur = self._offset_for(seed, ": restore_() first")
        self._run(seed, (1.0, float(offset) - cur), (1.0, 0.0, float(offset)), KernelMode.MASTER_VIEW)
        self._active = (seed, float(offset))
        return self

    def _offset_for(self, seed: int, hint: str) -> float:
        """The active offset when the set is perturbed by ``seed`` (0.0 when not perturbed); RuntimeError when it
        is perturbed by another seed (``hint`` ends the message)."""
        if self._active is None:
            return 0.0
        if self._active[0] != seed:
            raise RuntimeError(f"perturbed by seed {self._active[0]}, not {seed}{hint}")
        return self._active[1]

    def restore_(self) -> "ParamSet":
        """Undo the active perturbation (bit-exact in exact mode). A no-op when none is active."""
        if self._active is not None:
            seed, cur = self._active
            self._check_storage()
            self._run(seed, (1.0, -cur), (1.0, 0.0, 0.0), KernelMode.MASTER_VIEW)
            self._active = None
        return self

    def restore_update_(self, seed: int, lr: float, grad: float, weight_decay: float = 0.0) -> "ParamSet":
        """One fused pass: restore theta, then theta <- (1 - lr*wd)*theta - lr*grad*z(seed)."""
        seed = self._prepare(seed)
        cur = self._offset_for(seed, "")
        alpha = 1.0 - float(lr) * float(weight_decay)
        step = -float(lr) * float(grad)
        self._run(seed, (alpha, -alpha * cur + step), (alpha, step, 0.0), KernelMode.MASTER_UPDATE)
        self._active = None
        return self

    def update_(self, seed: int, lr: float, grad: float, weight_decay: float = 0.0,
                rounding: str = "nearest") -> "ParamSet":
        """theta <- (1 - lr*wd)*theta - lr*grad*z(seed), in place, one pass; refused while perturbed.

        ``rounding="stochastic"``: fp16/bf16 groups without masters round each element stochastically with bits of
        the SR stream of ``seed`` (``rng.stochastic_round``), so updates below half a spacing survive in
        expectation; fp32 groups round as usual, groups with masters update the master and view it."""
        if not isinstance(rounding, str):
            raise TypeError(f"rounding must be a str ({' or '.join(_ROUNDINGS)}), got {type(rounding).__name__}")
        if rounding not in _ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(map(repr, _ROUNDINGS))}, got {rounding!r}")
        seed = self._prepare(seed)
        if self._active is not None:
            raise RuntimeError(f"update_ while perturbed by seed {self._active[0]}: restore_() first "
                               "(or use restore_update_)")
        alpha = 1.0 - float(lr) * float(weight_decay)
        step = -float(lr) * float(grad)
        self._run(seed, (alpha, step), (alpha, step, 0.0), KernelMode.MASTER_UPDATE, rounding == "stochastic")
        return self

    # ------------------------------------------------------------------------------------------- copies (mode OUT)
    def _prepare_copy(self, seed: int, index: int | None = None) -> int:
        seed = self._check_draw(seed)
        # one tensor's copy reads only that tensor: when its storage is the one the tables know, the scan of every
        # tensor's storage (a rebuild check, O(tensors) per call and so O(tensors^2) per virtual forward) can wait
        # for a call that reads the others
        if index is None or self._tensors[index].data_ptr() != self._ptrs[index]:
            self._check_storage()
        if self._active is not None:
            raise RuntimeError(f"the weights are perturbed in place by seed {self._active[0]}: restore_() before "
                               "taking perturbed copies of theta")
        return seed

    def perturbed_copy(self, seed: int, offset: float, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``index`` (in ``tensors`` order) as ``round(theta + offset*z(seed))``, in one launch of mode OUT.

        ``out``: a contiguous tensor of theta's shape, dtype and device, not overlapping theta, or None for a new
        one. Returns ``out``. theta is never written and its version counter is not bumped. Refused (RuntimeError)
        while the set is perturbed in place."""
        index = check_index(index, len(self._tensors))
        seed = self._prepare_copy(seed, index)
        out = self._copier.out_for(index, out)
        if self._lowrank is not None and self._lowrank.covers(index):
            self._lowrank.copy(seed, float(offset), index, out)
            _compat.bump_version([out])
            self.launches += 1
        elif self._tensors[index].numel():
            self._copier.copy(self.backend_for(KernelMode.OUT), dense_seed(seed), float(offset), index, out)
            self.launches += 1
        return out

    def perturbed_copies(self, seed: int, offset: float) -> list[torch.Tensor]:
        """Every tensor as ``round(theta + offset*z(seed))`` in new buffers, one launch per dtype group.

        Returns tensors in ``tensors`` order, each of its theta's shape and dtype. theta is never written."""
        seed = self._prepare_copy(seed)
        backend = self.backend_for(KernelMode.OUT) if self._groups else None
        outs = self._copier.copies(backend, dense_seed(seed), float(offset))
        self.launches += len(self._groups)
        for e in self._lowrank.entries if self._lowrank is not None else ():
            self._lowrank.copy(seed, float(offset), e.index, outs[e.index])
            self.launches += 1
        return outs

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
        return (f"ParamSet({len(self._tensors)} tensors, {self.numel} elements, {groups}, backend={self.backend}, "
                f"distribution={self.distribution})")
