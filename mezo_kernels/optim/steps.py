"""The weight operations of a MeZO step: loss at theta + eps*z, loss at theta - eps*z, one update.

:class:`Stepper` issues every weight operation of a step, in one order for ``MeZO.step`` (losses from the closure)
and ``MeZO.replay_`` (the logged g instead of losses) alike: replay therefore repeats the same operations in the
same order and lands on the same bits, also in plain in-place mode where each perturbation pass rounds.

Two ways to show the closure the perturbed weights: ``"inplace"`` writes theta + eps*z into the weights, then
theta - eps*z, and fuses the restore with the update; ``"virtual"`` never writes them during the passes (each module
sees its trainable tensors materialised just in time by a ``VirtualPerturbation``), so restore is free and exact in
every dtype, and the update is the only write of a step (rounded stochastically in fp16/bf16 by default).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from ..perturb import ParamSet
from ..virtual import VirtualPerturbation

__all__ = ["Direction", "StepResult", "Stepper", "projected_grad"]


@dataclass
class Direction:
    seed: int
    g: float = 0.0
    skip: str | None = None      # None, "plus" or "minus": where a non-finite loss stopped the direction
    key: object = None           # what the weight operations draw from when not ``seed``: (seed_u, seed_v)

    @property
    def draw(self) -> object:
        return self.seed if self.key is None else self.key


class StepResult(NamedTuple):
    loss_plus: float     # mean over directions (NaN if every direction was skipped)
    loss_minus: float
    grad: float          # projected gradient g, mean over the valid directions
    seed: int            # seed of the first direction
    skipped: bool        # True when no direction gave finite losses (weights unchanged)


def projected_grad(loss_plus: float, loss_minus: float, eps: float) -> tuple[float, str | None]:
    """MeZO's rule for one direction: ``(g, None)`` with g = (L+ - L-) / (2 eps) rounded to fp32 (the kernels see
    fp32 anyway, and the log stays exact and short), or ``(0.0, "plus" | "minus")`` naming the first non-finite
    loss (the direction is then left out of the update)."""
    if not math.isfinite(loss_plus):
        return 0.0, "plus"
    if not math.isfinite(loss_minus):
        return 0.0, "minus"
    return float(torch.tensor((loss_plus - loss_minus) / (2 * eps))), None


Hyper = Sequence[tuple[float, float]]     # (lr, weight_decay) per param group, as the kernels apply them


class Stepper:
    """The passes and the update of a step over ``sets`` (one ``ParamSet`` per param group, None for an empty
    group), with perturbation scale ``eps``, mode ``perturb`` (``"inplace"``/``"virtual"``; ``virtual``: its
    hooks, None for an optimizer rebuilt without its model, which can replay but not run passes) and the update's
    ``rounding`` (``"nearest"``/``"stochastic"``). Every argument is checked by ``MeZO``.

    Across processes (``optim.distributed``): ``reduce`` averages a direction's (L+, L-) over the loss group in one
    call, or None; ``prepare`` runs before every weight write (FSDP2's reshard), or None (plain tensors)."""

    def __init__(self, sets: Sequence[ParamSet | None], eps: float, perturb: str, rounding: str,
                 virtual: VirtualPerturbation | None, reduce: Callable[[Sequence[float]], list[float]] | None = None,
                 prepare: Callable[[], None] | None = None):
        self.sets, self.eps, self.perturb, self.rounding, self.virtual = list(sets), eps, perturb, rounding, virtual
        self.reduce, self.prepare = reduce, prepare
        self._warned_unreached = False

    def _perturb(self, seed: int, offset: float) -> None:
        if self.prepare is not None:
            self.prepare()
        for ps in self.sets:
            if ps is not None:
                ps.perturb_(seed, offset)

    def restore(self) -> None:
        if self.prepare is not None:
            self.prepare()
        for ps in self.sets:
            if ps is not None:
                ps.restore_()

    def _pass(self, seed: int, offset: float, closure: Callable | None, micro_batches: int) -> float:
        """The loss at theta + offset*z(seed) (0.0 when replaying: ``closure`` None). In place, the weights stay
        perturbed afterwards (the next pass or the fused update starts from there); virtual, nothing was written."""
        if self.perturb == "inplace":
            self._perturb(seed, offset)
            return _loss(closure, micro_batches) if closure is not None else 0.0
        if closure is None:
            return 0.0
        with self.virtual.perturbed(seed, offset):
            loss = _loss(closure, micro_batches)
        unreached = self.virtual.unreached
        if unreached and not self._warned_unreached and math.isfinite(loss):
            self._warned_unreached = True
            warnings.warn(f"virtual perturbation: no module forward read {', '.join(unreached[:3])}"
                          f"{' ...' if len(unreached) > 3 else ''} during the pass; a tensor read "
                          "outside its own module's forward sees theta unperturbed (use perturb='inplace' there)",
                          RuntimeWarning, stacklevel=4)
        return loss

    def run(self, hyper: Hyper, seeds: Sequence[int], closure: Callable | None, micro_batches: int,
            recorded: Sequence[Direction] | None, keys: Sequence | None = None
            ) -> tuple[list[Direction], list[float], list[float]]:
        """Both passes of every direction, then the update: ``(directions, L+ list, L- list)`` (the lists hold the
        valid directions' losses). ``recorded``: the logged directions, replayed instead of calling ``closure``.
        ``keys``: per direction what the weights draw from when it is not the seed (lazy low-rank V), or None."""
        dirs, lps, lms = [], [], []
        n = len(seeds)
        # with a loss group every rank runs both passes (their forwards may be collectives), then one all-reduce
        # of the pair; a non-finite mean stops the direction after its - pass: skip "minus", as replay repeats it
        reduce = self.reduce if recorded is None else None
        try:
            for j, s in enumerate(seeds):
                d = Direction(s, key=None if keys is None else keys[j])
                lp = self._pass(d.draw, +self.eps, closure if recorded is None else None, micro_batches)
                if recorded is not None:
                    d.skip = recorded[j].skip
                elif reduce is None and not math.isfinite(lp):
                    d.skip = "plus"
                if d.skip == "plus":
                    self.restore(); dirs.append(d); continue
                lm = self._pass(d.draw, -self.eps, closure if recorded is None else None, micro_batches)
                if reduce is not None:
                    lp, lm = reduce((lp, lm))
                    if not (math.isfinite(lp) and math.isfinite(lm)):
                        d.skip = "minus"
                elif recorded is None and not math.isfinite(lm):
                    d.skip = "minus"
                if d.skip == "minus":
                    self.restore(); dirs.append(d); continue
                d.g = recorded[j].g if recorded is not None else projected_grad(lp, lm, self.eps)[0]
                lps.append(lp); lms.append(lm)
                if j < n - 1:
                    self.restore()
                dirs.append(d)
            self.commit(hyper, dirs)
        finally:
            self.restore()           # never leave the weights perturbed, whatever happened above
        return dirs, lps, lms

    def commit(self, hyper: Hyper, dirs: Sequence[Direction]) -> None:
        """Apply the averaged update; in place with nearest rounding, the still-perturbed last direction first,
        fused with its restore; otherwise restore (a no-op when virtual), then one update pass per direction."""
        valid = [d for d in dirs if d.skip is None]
        if not valid:
            return
        if self.prepare is not None:
            self.prepare()
        if self.perturb == "virtual" or self.rounding == "stochastic":
            self.restore()
            for i, d in enumerate(valid):
                for ps, (lr, wd) in zip(self.sets, hyper):
                    # theta*1 + 0*z is theta in every rounding: skipping the pass keeps the weights' versions
                    # (and the caches keyed on them) for lr = 0 or g = 0
                    if ps is not None and (lr * d.g != 0 or (lr * wd != 0 and i == 0)):
                        ps.update_(d.draw, lr, d.g / len(valid), wd if i == 0 else 0.0, rounding=self.rounding)
            return
        order = ([valid[-1]] + valid[:-1]) if dirs[-1].skip is None else valid
        for i, d in enumerate(order):
            for ps, (lr, wd) in zip(self.sets, hyper):
                if ps is not None:   # decay lr*wd once per step; the directions' steps are averaged
                    ps.restore_update_(d.draw, lr, d.g / len(valid), wd if i == 0 else 0.0)


def _loss(closure: Callable, micro_batches: int) -> float:
    total = 0.0
    for i in range(micro_batches):
        v = closure(i) if micro_batches > 1 else closure()
        total += float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
    return total / micro_batches
