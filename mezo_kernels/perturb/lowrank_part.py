"""The low-rank entries of a ``ParamSet`` (``distribution="lowrank"``, issue 21): the tensors whose z is
``U Vᵀ / sqrt(r)`` (``docs/rng_spec.md``, "Low-rank directions"), run through the fused low-rank pass
(``perturb.lowrank``) one tensor at a time, while the set's other tensors (1-d ones, small ones) keep the dense
Gaussian group launches.

An entry is a block of a larger 2-d tensor when the set holds a shard: ``blocks[i] = (global base, (M, N))`` of the
full tensor, and the entry's offset inside it follows from its own base (``base - global base = row0*N + col0``):
a ``Shard(0)`` run is whole rows, a run of a ``Shard(1)`` block one row piece. The block then gets exactly the bits
of the single-process update (``full_shape``/``start`` of the fused pass).

The kernel modes of the dense path map onto ``lowrank_axpby_`` (alpha, beta as the ABI's, ``docs/kernel_abi.md``):
``AXPBY``/``AXPBY_SR`` on the weight itself; ``MASTER_UPDATE`` on the fp32 master, then the weight is the master
viewed at ``gamma``; ``MASTER_VIEW`` the master viewed at ``gamma`` (an fp32 scratch of the one tensor, rounded
once more to the weight's dtype: the reference path, the forward-side application never materialises z).

Seeds: an int (``seed_u = seed_v``) or a pair ``(seed_u, seed_v)`` (LoZO's lazy V), see :func:`seed_pair`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import kernels as _bk
from .. import rng
from ..rng import Distribution, KernelMode
from ..rng.lowrank import check_rank, uses_lowrank
from .lowrank import lowrank_axpby_
from .plan import _Group, fill_normal_

__all__ = ["LowRankPart", "seed_pair", "check_draw", "dense_seed", "SeedLike"]

SeedLike = "int | tuple[int, int]"


def seed_pair(seed: object) -> tuple[int, int]:
    """``(seed_u, seed_v)`` of a direction: an int is both; a pair is checked as two seeds."""
    if isinstance(seed, tuple):
        if len(seed) != 2:
            raise ValueError(f"a low-rank seed pair is (seed_u, seed_v), got {len(seed)} values")
        return rng.check_seed(seed[0]), rng.check_seed(seed[1])
    s = rng.check_seed(seed)
    return s, s


def check_draw(seed: object) -> int | tuple[int, int]:
    """What a direction draws from, checked once: a seed, or a ``(seed_u, seed_v)`` pair (lazy low-rank V)."""
    return seed_pair(seed) if isinstance(seed, tuple) else rng.check_seed(seed)


def dense_seed(draw: int | tuple[int, int]) -> int:
    """The seed the dense tensors of a checked draw use: the seed itself, or a pair's seed_u."""
    return draw[0] if isinstance(draw, tuple) else draw


@dataclass
class _Entry:
    index: int                      # in the set's tensors order
    name: str
    w: torch.Tensor                 # the stored tensor as a 2-d block (a view)
    master: torch.Tensor | None     # its fp32 master (same 2-d shape), or None
    gbase: int                      # the full tensor's base
    full: tuple[int, int]           # the full tensor's shape
    start: tuple[int, int]          # the block's (row0, col0) in it


def _block(name: str, t: torch.Tensor, base: int, block: tuple[int, tuple[int, int]] | None, r: int):
    """``(2-d view, gbase, full, start)`` of entry ``t`` when its full tensor is low-rank, else None."""
    if block is None:
        if t.dim() != 2 or not uses_lowrank(t.shape, r):
            return None
        return t, base, (int(t.shape[0]), int(t.shape[1])), (0, 0)
    gbase, full = int(block[0]), (int(block[1][0]), int(block[1][1])) if len(block[1]) == 2 else None
    if full is None or not uses_lowrank(full, r):
        return None
    off = base - gbase
    row0, col0 = divmod(off, full[1])
    n = t.numel()
    if col0 == 0 and n % full[1] == 0:                  # whole rows
        shape = (n // full[1], full[1])
    elif col0 + n <= full[1]:                           # a piece of one row
        shape = (1, n)
    else:
        raise ValueError(f"{name}: a run of {n} elements at offset {off} of a {full} tensor is neither whole rows "
                         "nor a piece of one row; the low-rank pass updates 2-d blocks")
    if off < 0 or row0 + shape[0] > full[0]:
        raise ValueError(f"{name}: base {base} is outside its tensor ({full} at base {gbase})")
    return t.view(shape), gbase, full, (row0, col0)


class LowRankPart:
    """The entries of a set that get rank-``r`` directions, with ``backend`` (as the set's) and the set's masters
    (``masters[i]``: entry i's fp32 master or None). ``blocks``: None (every tensor whole), or per entry the full
    tensor's ``(base, shape)`` (None for an entry that is a whole tensor)."""

    def __init__(self, names: Sequence[str], tensors: Sequence[torch.Tensor], bases: Sequence[int], r: int,
                 backend: str, exact: bool | None, blocks: Sequence | None = None):
        self.r = check_rank(r)
        self.backend = backend
        self.entries: list[_Entry] = []
        for i, (name, t, b) in enumerate(zip(names, tensors, bases)):
            if not t.numel():
                continue
            got = _block(name, t.detach(), int(b), None if blocks is None else blocks[i], self.r)
            if got is None:
                continue
            w, gbase, full, start = got
            keep = exact if exact is not None else t.dtype in (torch.float16, torch.bfloat16)
            master = w.float().clone() if keep else None
            self.entries.append(_Entry(i, name, w, master, gbase, full, start))
        self.indices = frozenset(e.index for e in self.entries)
        self._by_index = {e.index: e for e in self.entries}
        # the full tensors whose factors a forward needs (runs of one sharded tensor share them), and the fill
        # plans that draw them all in one launch per seed (built on first use, pointed at each call's buffer)
        self._fulls = list(dict.fromkeys((e.gbase, e.full) for e in self.entries))
        self._plans: dict[str, _Group] = {}

    def covers(self, index: int) -> bool:
        return index in self.indices

    def masters(self) -> dict[int, torch.Tensor]:
        return {e.index: e.master for e in self.entries if e.master is not None}

    def _axpby(self, t: torch.Tensor, e: _Entry, su: int, sv: int, alpha: float, beta: float,
               rounding: str = "nearest") -> None:
        lowrank_axpby_(t, su, sv, e.gbase, self.r, alpha, beta, rounding, self.backend, full_shape=e.full,
                       start=e.start)

    def _view(self, e: _Entry, su: int, sv: int, gamma: float, out: torch.Tensor) -> None:
        """``out = round(fma(z, gamma, master))``: the master viewed at ``gamma`` (never written)."""
        if gamma == 0.0:
            out.copy_(e.master)
            return
        tmp = e.master.clone()
        self._axpby(tmp, e, su, sv, 1.0, gamma)
        out.copy_(tmp)

    def run(self, seed: object, plain: tuple[float, float], master: tuple[float, float, float],
            master_mode: KernelMode, stochastic: bool) -> None:
        """The set's operation on every entry: ``plain`` (alpha, beta) on entries without masters (stochastic
        rounding for fp16/bf16 when asked), ``master_mode`` with ``master`` (alpha, beta, gamma) on the others."""
        su, sv = seed_pair(seed)
        with torch.no_grad():
            for e in self.entries:
                if e.master is None:
                    sr = stochastic and e.w.dtype != torch.float32
                    self._axpby(e.w, e, su, sv, *plain, "stochastic" if sr else "nearest")
                elif master_mode == KernelMode.MASTER_UPDATE:
                    self._axpby(e.master, e, su, sv, master[0], master[1])
                    self._view(e, su, sv, master[2], e.w)
                else:
                    self._view(e, su, sv, master[2], e.w)

    def copy(self, seed: object, offset: float, index: int, out: torch.Tensor) -> None:
        """``out = round(theta + offset*z)`` of entry ``index`` (theta never written): mode OUT."""
        e = self._by_index[index]
        su, sv = seed_pair(seed)
        with torch.no_grad():
            if e.master is not None:
                self._view(e, su, sv, offset, out.view(e.w.shape))
                return
            tmp = e.w.float() if e.w.dtype != torch.float32 else e.w.clone()
            self._axpby(tmp, e, su, sv, 1.0, offset)
            out.view(e.w.shape).copy_(tmp)

    def factors(self, seed: object, index: int, dtype: torch.dtype | None = None):
        """``(U, V)`` of entry ``index``'s *full* tensor for ``seed`` (float32, or ``dtype``): what the forward-side
        application multiplies by (``virtual.lowrank``). Drawn by the set's backend, whose Gaussian stream is the
        one its update pass regenerates, so the forward sees the bits of the z the update applies."""
        e = self._by_index[index]
        su, sv = seed_pair(seed)
        M, N = e.full
        u = fill_normal_(torch.empty(M * self.r, device=e.w.device), su, e.gbase, self.backend).view(M, self.r)
        v = fill_normal_(torch.empty(N * self.r, device=e.w.device), sv, e.gbase + M * self.r,
                         self.backend).view(N, self.r)
        return (u, v) if dtype is None else (u.to(dtype), v.to(dtype))

    def factors_all(self, seed: object) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{index: (U, V)}`` of every entry for ``seed`` (float32 views of one new buffer), drawn by the set's
        backend in one launch (two with a lazy-V pair): the same bits as :meth:`factors`, without a plan and a
        launch per tensor in every forward."""
        su, sv = seed_pair(seed)
        if not self.entries:
            return {}
        dev, r = self.entries[0].w.device, self.r
        sizes = [(M * r, N * r) for _, (M, N) in self._fulls]
        buf = torch.empty(sum(a + b for a, b in sizes), device=dev)
        us, vs, uvs, at = [], [], [], 0
        for a, b in sizes:
            us.append(buf[at:at + a]); vs.append(buf[at + a:at + a + b]); uvs.append(buf[at:at + a + b]); at += a + b
        if su == sv:           # U then V: one contiguous run of indices per tensor, [gbase, gbase + r(M + N))
            self._fill("uv", uvs, [g for g, _ in self._fulls], su)
        else:
            self._fill("u", us, [g for g, _ in self._fulls], su)
            self._fill("v", vs, [g + M * r for g, (M, _) in self._fulls], sv)
        by_full = {key: (u.view(key[1][0], r), v.view(key[1][1], r)) for key, u, v in zip(self._fulls, us, vs)}
        return {e.index: by_full[(e.gbase, e.full)] for e in self.entries}

    def _fill(self, which: str, dsts: list[torch.Tensor], bases: list[int], seed: int) -> None:
        plan = self._plans.get(which)
        if plan is None:
            plan = self._plans[which] = _Group(dsts, bases, None)
        plan.retarget(dsts)
        try:
            _bk.choose(self.backend, dsts[0].device, KernelMode.FILL, Distribution.GAUSSIAN).launch(
                plan, seed, 0.0, 1.0, 0.0, KernelMode.FILL, Distribution.GAUSSIAN)
        finally:
            plan.release()

    def entry(self, index: int) -> _Entry:
        return self._by_index[index]
