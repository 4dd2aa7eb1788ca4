"""Virtual perturbation: the +/-eps passes see theta + offset*z without a single write to the stored weights.

``VirtualPerturbation(model, param_sets)`` finds, for every tensor of the sets, the modules that own it as a
parameter of their own (a tied weight has several owners, one tensor, hence one z). Inside
``with vp.perturbed(seed, offset):`` each owner's forward runs on a transient buffer
``round(theta + offset*z(seed))`` written by the kernels (``ParamSet.perturbed_copy``, mode OUT, the set's bases and
distribution, so z is the z of the in-place path): a forward pre-hook materialises it and puts it in the parameter's
slot, the matching forward hook (``always_call``: it runs when the forward raises too) puts theta back and drops
the buffer. So at most one module's tensors are materialised at a time (nested owners excepted), and the stored
weights keep their bits and their version counters; restoring costs nothing and is exact in every dtype.

While the block runs, ``weight_state`` lists the perturbed storages with their (seed, offset, distribution, base),
which version-keyed caches (the forward engine) add to their keys. Leaving the block, even by an exception, removes
the hooks, puts back any parameter still swapped and clears that registry.

An ``nn.Embedding`` materialises only the rows its tokens read, and a weight larger than ``slice_bytes`` of an
``nn.Linear`` (an LM head tied to a large vocabulary) goes in blocks of output rows (``virtual_slices.py``), so the
transient memory stays at one slice.

A module whose parameter is read by code outside its own forward (``other.weight`` inside another module) would
see theta, not the perturbation: ``unreached`` names the tensors no forward materialised during the last block.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .. import _compat
from . import state as weight_state
from ..perturb import ParamSet
from ..perturb.lowrank_part import check_draw
from .lowrank import LowRankHooks, materialised
from .arena import arena_bytes, own_buffer
from .sharded import Wrapped, materialise
from .slices import perturbed_rows, sliced_forward

__all__ = ["VirtualPerturbation"]
_ALIGN = 64                                     # bytes: each arena buffer starts on a cache line


class VirtualPerturbation:
    """Hooks that show ``model``'s modules the tensors of ``param_sets`` as ``round(theta + offset*z(seed))``.

    Args:
        model: the module tree that owns every tensor of the sets (their storages must be parameters of modules
            in it; ValueError naming the first one that is not).
        param_sets: the ``ParamSet`` objects whose tensors are perturbed (their bases and distribution give z).
        slice_bytes: an ``nn.Linear`` weight larger than this (bytes) is materialised in blocks of output rows of
            half this size; an ``nn.Embedding`` (without ``max_norm``) always gathers its tokens' rows (module
            docstring). None: every tensor whole.
        wrapped: parameters held by their module as a wrapper (a tensor-parallel DTensor) whose local runs are
            entries of the sets (``virtual.sharded``); they are materialised whole, never in slices.

    Attributes (statistics): ``copies`` (materialisations so far), ``live_bytes`` (transient buffers alive now),
    ``peak_bytes`` (their largest total since construction or :meth:`reset_peak`), ``reserved_bytes`` (what the
    transient memory holds from the system now: the pass's whole arena, used or not, plus the buffers outside it),
    ``peak_reserved_bytes`` (its largest value since construction or :meth:`reset_peak`), ``unreached`` (names of the
    tensors that no forward materialised during the last ``perturbed`` block).
    """

    def __init__(self, model: nn.Module, param_sets: Sequence[ParamSet], slice_bytes: int | None = 64 * 2**20,
                 wrapped: Sequence[Wrapped] = ()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the modules that own the parameters), got "
                            f"{type(model).__name__}")
        self.param_sets, self._wrapped = list(param_sets), list(wrapped)
        by_param = {id(w.param): k for k, w in enumerate(self._wrapped)}
        where: dict[int, tuple[int, int]] = {}               # data_ptr -> (set, index in the set)
        for si, ps in enumerate(self.param_sets):
            for ti, t in enumerate(ps.tensors):
                if t.numel():
                    where[t.data_ptr()] = (si, ti)
        # per owner module: [(parameter name, set, index)]; a tied tensor appears under each of its owners
        self._owners: list[tuple[nn.Module, list[tuple[str, int, int]]]] = []
        found: set[tuple[int, int]] = set()
        for module in model.modules():
            own = []
            for name, p in module.named_parameters(recurse=False):
                k = by_param.get(id(p))
                if k is not None:                 # set -1: wrapped parameter k
                    own.append((name, -1, k))
                    found.update((si, ti) for si, ti, _ in self._wrapped[k].runs)
                    continue
                hit = where.get(p.data_ptr()) if p.numel() and not _compat.is_dtensor(p) else None
                if hit is not None:
                    if p.shape != self.param_sets[hit[0]].tensors[hit[1]].shape:
                        raise ValueError(f"{type(module).__name__}.{name} shares storage with "
                                         f"{self.param_sets[hit[0]].names[hit[1]]} but has another shape")
                    own.append((name, *hit))
                    found.add(hit)
            if own:
                self._owners.append((module, own))
        missing = [ps.names[ti] for si, ps in enumerate(self.param_sets) for ti, t in enumerate(ps.tensors)
                   if t.numel() and (si, ti) not in found]
        if missing:
            raise ValueError(f"{len(missing)} trainable tensor(s) are not parameters of any module of the model "
                             f"(first: {missing[0]}); virtual perturbation swaps them inside their module's "
                             "forward, so pass model= the module tree that owns them (or perturb='inplace')")
        # low-rank weights (distribution="lowrank") take a rank-r term in their module's output instead of a copy
        # (an embedding subclass reading other inputs is materialised instead: ``virtual.lowrank.materialised``)
        term = lambda m, e: _is_lowrank(self.param_sets, e) and not materialised(m)  # noqa: E731
        low = [(m, [e for e in own if term(m, e)]) for m, own in self._owners]
        low = [(m, es) for m, es in low if es]
        self._lowrank = LowRankHooks(self.param_sets, low) if low else None
        if low:
            self._owners = [(m, [e for e in own if not term(m, e)]) for m, own in self._owners]
            self._owners = [(m, own) for m, own in self._owners if own]
        self._arena: torch.Tensor | None = None              # transient buffers of one block (see _alloc)
        self._arena_need, self._top, self._marks = 0, 0, []
        # owners whose large weight goes in slices: their forward is replaced during a block instead of hooked
        self._sliced: list[tuple[nn.Module, Callable]] = []
        for module, own in self._owners:
            fwd = self._slicer(module, own, slice_bytes)
            if fwd is not None:
                self._sliced.append((module, fwd))
        sliced = {id(m) for m, _ in self._sliced}
        self._hooked = [(m, own) for m, own in self._owners if id(m) not in sliced]
        self._by_id = {id(m): own for m, own in self._hooked}   # the modules are alive as long as the model
        # the arena holds any module's buffers up to half of slice_bytes, except those of the one module larger
        # than all others (arena.arena_bytes): the rest (an LM head) are allocated only while their module runs
        self._arena_need = max(self._arena_need, arena_bytes(
            [sum(self._bytes(si, ti) for _, si, ti in own) for _, own in self._hooked], (slice_bytes or 0) // 2))
        self._active: tuple[int, float] | None = None
        self._depth: dict[int, int] = {}                      # id(module) -> nesting depth of its forward
        self._swapped: dict[tuple[int, str], tuple[nn.Module, torch.Tensor]] = {}
        self._reached: set[tuple[int, int]] = set()
        self.copies = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self.reserved_bytes = 0
        self.peak_reserved_bytes = 0
        self.unreached: list[str] = []

    @property
    def modules(self) -> list[nn.Module]:
        """The owner modules, in ``model.modules()`` order."""
        return [m for m, _ in self._owners]

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes
        self.peak_reserved_bytes = self.reserved_bytes

    # ------------------------------------------------------------------------------------------- the block
    @contextlib.contextmanager
    def perturbed(self, seed: int, offset: float) -> Iterator["VirtualPerturbation"]:
        """Every owner module's forward inside the block reads ``round(theta + offset*z(seed))``."""
        if self._active is not None:
            raise RuntimeError(f"already perturbed by seed {self._active[0]}: virtual perturbations do not nest")
        seed = check_draw(seed)                  # a pair: lazy low-rank V
        offset = float(offset)
        entries = {}
        for ps in self.param_sets:
            for i, (t, base) in enumerate(zip(ps.tensors, ps.bases)):
                if t.numel():
                    dist = f"lowrank{ps.lowrank.r}" if ps.lowrank is not None and ps.lowrank.covers(i) else \
                        ps.distribution
                    entries[t.data_ptr()] = weight_state.Perturbation(seed, offset, dist, int(base))
        handles, installed = [], []
        self._reached.clear()
        with weight_state.activated(entries):
            self._active = (seed, offset)
            try:
                for module, _ in self._hooked:
                    handles.append(module.register_forward_pre_hook(self._pre))
                    handles.append(module.register_forward_hook(self._post, always_call=True))
                if self._lowrank is not None:
                    handles += self._lowrank.install(seed, offset, self._reached)
                for module, fwd in self._sliced:
                    if "forward" in vars(module):
                        raise RuntimeError(f"{type(module).__name__} already has its forward replaced (another "
                                           "wrapper); pass slice_bytes=None to materialise its weight whole")
                    module.forward = fwd
                    installed.append(module)
                yield self
            finally:
                for h in handles:
                    h.remove()
                if self._lowrank is not None:
                    self._lowrank.clear()
                for module in installed:
                    del module.forward
                self._put_back_all()
                self.live_bytes, self._top, self._marks, self._arena = 0, 0, [], None   # the arena lives per block
                self.reserved_bytes = 0
                self._active = None
                self._depth.clear()
                self.unreached = [self.param_sets[si].names[ti] for si, ps in enumerate(self.param_sets)
                                  for ti, t in enumerate(ps.tensors) if t.numel() and (si, ti) not in self._reached]

    # ------------------------------------------------------------------------------------------- slices
    def _slicer(self, module: nn.Module, own: list[tuple[str, int, int]], slice_bytes: int | None):
        """The sliced forward of ``module`` when its weight is large and the module type allows it, else None."""
        hit = {name: (si, ti) for name, si, ti in own}
        if slice_bytes is None or "weight" not in hit or any(si < 0 for _, si, _ in own):
            return None
        si, ti = hit["weight"]
        theta = self.param_sets[si].tensors[ti]
        row_bytes = theta[0].numel() * theta.element_size() if theta.dim() == 2 else 0
        # an embedding reads a few rows of its table: gathering just those is exact and cheaper at any size
        small = theta.numel() * theta.element_size() <= slice_bytes
        if not row_bytes or small and not (type(module) is nn.Embedding and module.max_norm is None):
            return None

        def weight(rows):
            seed, offset = self._active
            out = self._alloc((len(rows), theta.shape[1]), theta)
            self._reached.add((si, ti))
            return perturbed_rows(self.param_sets[si], seed, offset, ti, rows, out=out)

        def bias():
            if "bias" not in hit:
                return module.bias
            bsi, bti = hit["bias"]
            self._reached.add((bsi, bti))
            b = self.param_sets[bsi].tensors[bti]
            return self.param_sets[bsi].perturbed_copy(*self._active, bti, out=self._alloc(b.shape, b))

        block = max(1, slice_bytes // 2 // row_bytes)
        # an embedding's rows (its batch's distinct tokens, unknown here) share the arena sized by the others or
        # get their own buffer: a block reserved for them was held through every pass, loss included (#21, item 5)
        if type(module) is nn.Linear:
            self._arena_need = max(self._arena_need, block * row_bytes + 2 * _ALIGN + sum(
                self.param_sets[s_].tensors[t_].numel() * theta.element_size() for n_, s_, t_ in own
                if n_ != "weight"))
        return sliced_forward(module, weight, lambda buf: self._free(), bias, block)

    # ------------------------------------------------------------------------------------------- transient memory
    def _alloc(self, shape, like: torch.Tensor) -> torch.Tensor:
        """A transient buffer of ``shape`` and ``like``'s dtype/device: the next free stretch of the block's arena
        (one allocation per block, so no page faults per module), or a fresh tensor when the arena is full (nested
        owners) or autograd may keep the buffer (grad mode). Buffers are freed last-in first-out (:meth:`_free`),
        as module calls nest."""
        n = math.prod(shape) * like.element_size()
        start = self._top
        if not torch.is_grad_enabled() and start + n <= self._arena_need:
            if self._arena is None or self._arena.device != like.device:
                self.reserved_bytes += self._arena_need if self._arena is None else 0
                self._arena = own_buffer((self._arena_need,), torch.uint8, like.device)   # see arena.py
            buf = self._arena[start:start + n].view(like.dtype).view(shape)
            self._top = start + -(-n // _ALIGN) * _ALIGN
            own = 0
        else:
            if start == 0 and self._arena is not None:
                # nothing lives in the arena: free it before a buffer too large for it (the one largest module,
                # arena.arena_bytes), so the two are never held at once; a later module maps a new one
                self._arena = None
                self.reserved_bytes -= self._arena_need
            buf = own_buffer(shape, like.dtype, like.device)
            own = n
        self._marks.append((start, n, own))
        self.copies += 1
        self.live_bytes += n
        self.reserved_bytes += own
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return buf

    def _free(self) -> None:
        start, n, own = self._marks.pop()
        self.reserved_bytes -= own
        self._top = start
        self.live_bytes -= n

    # ------------------------------------------------------------------------------------------- the hooks
    def _entries(self, module: nn.Module) -> list[tuple[str, int, int]]:
        return self._by_id.get(id(module), [])

    def _pre(self, module: nn.Module, args) -> None:
        mid = id(module)
        depth = self._depth.get(mid, 0)
        self._depth[mid] = depth + 1
        if depth or self._active is None:        # a re-entrant call already sees the buffers
            return
        seed, offset = self._active
        for name, si, ti in self._entries(module):
            if si < 0:
                w = self._wrapped[ti]
                buf = materialise(self.param_sets, w, seed, offset, self._alloc(w.local.shape, w.local))
                self._reached.update((s_, t_) for s_, t_, _ in w.runs)
            else:
                theta = self.param_sets[si].tensors[ti]
                buf = self.param_sets[si].perturbed_copy(seed, offset, ti, out=self._alloc(theta.shape, theta))
                self._reached.add((si, ti))
            self._swapped[(mid, name)] = (module, _compat.swap_parameter(module, name, buf))

    def _post(self, module: nn.Module, args, output):
        mid = id(module)
        depth = self._depth.get(mid, 1) - 1
        self._depth[mid] = depth
        if depth > 0:
            return None
        for name, _, _ in self._entries(module):
            self._put_back(mid, name)
        # an output that is a view of its weight (a module returning a parameter slice) would be overwritten by
        # the next module's buffer: hand out a copy instead
        if self._arena is not None and _in(output, self._arena):
            return output.clone() if isinstance(output, torch.Tensor) else type(output)(
                o.clone() if isinstance(o, torch.Tensor) else o for o in output)
        return None

    def _put_back(self, mid: int, name: str) -> None:
        entry = self._swapped.pop((mid, name), None)
        if entry is not None:
            module, theta = entry
            _compat.swap_parameter(module, name, theta)
            self._free()

    def _put_back_all(self) -> None:
        for mid, name in list(self._swapped):
            self._put_back(mid, name)


    def _bytes(self, si: int, ti: int) -> int:
        """Arena bytes of entry (set ``si``, index ``ti``), or of wrapped parameter ``ti`` when ``si`` is -1."""
        n = self._wrapped[ti].nbytes() if si < 0 else \
            self.param_sets[si].tensors[ti].numel() * self.param_sets[si].tensors[ti].element_size()
        return -(-n // _ALIGN) * _ALIGN


def _is_lowrank(param_sets: Sequence[ParamSet], entry: tuple[str, int, int]) -> bool:
    _, si, ti = entry
    return si >= 0 and param_sets[si].lowrank is not None and param_sets[si].lowrank.covers(ti)


def _in(output, arena: torch.Tensor) -> bool:
    """Whether ``output`` (a tensor, or a tuple/list holding tensors) lives in ``arena``'s storage."""
    ptr = arena.untyped_storage().data_ptr()
    outs = [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, (tuple, list)) else []
    # a tensor subclass (a DTensor, an async collective's result) is never a view of the arena
    return any(type(o) is torch.Tensor and o.untyped_storage().data_ptr() == ptr for o in outs)
