"""The MeZO optimizer: ``step(closure)`` = +eps, closure, -eps, closure, one fused restore+update.

Model-agnostic: it sees tensors and a closure returning a float loss, never transformers or peft.

Every weight operation of a step is issued by ``_run_step``, which both ``step`` (losses from the closure) and
``replay_`` (losses from the log) call. Replay therefore repeats the same operations in the same order and lands on
the same bits, also in plain in-place mode where each perturbation pass rounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

from . import rng
from .perturb import ParamSet, split_named


def no_decay(name: str, t: torch.Tensor) -> bool:
    """The paper's rule: no weight decay on biases and normalization weights (1-d tensors)."""
    low = name.lower()
    return t.dim() <= 1 or "bias" in low or "norm" in low or "ln_" in low


class StepResult(NamedTuple):
    loss_plus: float     # mean over directions (NaN if every direction was skipped)
    loss_minus: float
    grad: float          # projected gradient g, mean over the valid directions
    seed: int            # seed of the first direction
    skipped: bool        # True when no direction gave finite losses (weights unchanged)


@dataclass
class _Dir:
    seed: int
    g: float = 0.0
    skip: str | None = None      # None, "plus" or "minus": where a non-finite loss stopped the direction


class MeZO:
    """Zeroth-order SGD (MeZO) over a set of tensors, shaped like ``torch.optim``.

    Args:
        params: tensors or ``(name, tensor)`` pairs, all requiring grad (the trainable set), one device.
        lr, eps: learning rate and perturbation scale. weight_decay: decoupled, not on biases/norms.
        seed: base seed; step t, direction j uses ``splitmix64(seed + golden*(t*n + j + 1))``.
        n_directions: directions per step, their updates averaged.
        schedule: ``"constant"`` or ``"linear"`` (to 0 at ``total_steps``).
        exact_restore: passed to ``ParamSet`` (default: fp32 masters for fp16/bf16 tensors).
        bases: explicit global base index per tensor (default: running sum over ``params``). A tensor-parallel
            shard passes the bases of the unsharded parameters (``distributed.sharded_params``) so that its z is
            exactly the z of a single-process run.
    """

    def __init__(self, params: Iterable, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 backend: str = "auto", n_directions: int = 1, schedule: str = "constant",
                 total_steps: int | None = None, exact_restore: bool | None = None,
                 bases: Sequence[int] | None = None):
        names, tensors = split_named(params)
        for v, what in ((lr, "lr"), (eps, "eps"), (weight_decay, "weight_decay")):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{what} must be a finite number >= 0, got {v!r}")
        if eps == 0:
            raise ValueError("eps must be > 0")
        if not isinstance(n_directions, int) or n_directions < 1:
            raise ValueError(f"n_directions must be an int >= 1, got {n_directions!r}")
        if schedule not in ("constant", "linear"):
            raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
        if schedule == "linear" and not (isinstance(total_steps, int) and total_steps > 0):
            raise ValueError("the linear schedule needs total_steps > 0")
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)
        self.seed, self.n_directions = rng.check_seed(seed), n_directions
        self.schedule, self.total_steps = schedule, total_steps
        if bases is None:
            bases = rng.default_bases(t.numel() for t in tensors)   # global over the whole set: grouping-invariant
        else:
            bases = list(bases)                                      # values are checked by ParamSet
            if len(bases) != len(tensors):
                raise ValueError(f"bases has {len(bases)} entries for {len(tensors)} tensors")
        split = [no_decay(n, t) for n, t in zip(names, tensors)] if weight_decay > 0 else [False] * len(tensors)
        self._sets: list[tuple[ParamSet, bool]] = []
        for exempt in (False, True):
            idx = [i for i, s in enumerate(split) if s == exempt]
            if idx:
                ps = ParamSet([(names[i], tensors[i]) for i in idx], bases=[bases[i] for i in idx],
                              backend=backend, exact_restore=exact_restore, require_grad=True)
                self._sets.append((ps, not exempt))
        self.step_count = 0
        self.skipped_directions = 0
        self.zero_grad_steps = 0
        self.log: list[dict] = []

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def param_sets(self) -> list[ParamSet]:
        return [ps for ps, _ in self._sets]

    @property
    def version(self) -> int:
        """Changes whenever any weight is written (for caches keyed on the weights)."""
        return sum(ps.version for ps in self.param_sets)

    def lr_at(self, step: int) -> float:
        if self.schedule == "linear":
            return self.lr * max(0.0, 1.0 - step / self.total_steps)
        return self.lr

    def seed_for(self, step: int, j: int = 0) -> int:
        return rng.seed_for(self.seed, step, j, self.n_directions)

    def _perturb(self, seed: int, offset: float) -> None:
        for ps, _ in self._sets:
            ps.perturb_(seed, offset)

    def _restore(self) -> None:
        for ps, _ in self._sets:
            ps.restore_()

    @staticmethod
    def _loss(closure: Callable, micro_batches: int) -> float:
        total = 0.0
        for i in range(micro_batches):
            v = closure(i) if micro_batches > 1 else closure()
            total += float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
        return total / micro_batches

    # ------------------------------------------------------------------------------------------- the step
    def _run_step(self, step: int, lr: float, wd: float, seeds: Sequence[int], closure: Callable | None,
                  micro_batches: int, recorded: Sequence[_Dir] | None) -> tuple[list[_Dir], list, list]:
        dirs, lps, lms = [], [], []
        n = len(seeds)
        try:
            for j, s in enumerate(seeds):
                d = _Dir(s)
                self._perturb(s, +self.eps)
                lp = self._loss(closure, micro_batches) if recorded is None else 0.0
                if recorded is not None:
                    d.skip = recorded[j].skip
                elif not math.isfinite(lp):
                    d.skip = "plus"
                if d.skip == "plus":
                    self._restore(); dirs.append(d); continue
                self._perturb(s, -self.eps)
                lm = self._loss(closure, micro_batches) if recorded is None else 0.0
                if recorded is None and not math.isfinite(lm):
                    d.skip = "minus"
                if d.skip == "minus":
                    self._restore(); dirs.append(d); continue
                # g rounded to fp32 before use: the kernels see fp32 anyway, and the log stays exact and short
                d.g = recorded[j].g if recorded is not None else float(torch.tensor((lp - lm) / (2 * self.eps)))
                lps.append(lp); lms.append(lm)
                if j < n - 1:
                    self._restore()
                dirs.append(d)
            self._commit(lr, wd, dirs)
        finally:
            self._restore()          # never leave the weights perturbed, whatever happened above
        return dirs, lps, lms

    def _commit(self, lr: float, wd: float, dirs: list[_Dir]) -> None:
        """Apply the averaged update; the still-perturbed last direction first, fused with its restore."""
        valid = [d for d in dirs if d.skip is None]
        if not valid:
            return
        order = ([valid[-1]] + valid[:-1]) if dirs[-1].skip is None else valid
        for i, d in enumerate(order):
            for ps, decays in self._sets:
                # decay lr*wd once per step; the directions' steps are averaged (g / number of valid ones)
                ps.restore_update_(d.seed, lr, d.g / len(valid), wd if (decays and i == 0) else 0.0)

    def step(self, closure: Callable, micro_batches: int = 1) -> StepResult:
        """One MeZO step. ``closure()`` (or ``closure(i)`` for micro-batch i when ``micro_batches > 1``) returns the
        loss at the current weights as a float or a tensor; every micro-batch sees the same z."""
        if not callable(closure):
            raise TypeError("step() needs a closure that returns the loss")
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        t, lr = self.step_count, self.lr_at(self.step_count)
        seeds = [self.seed_for(t, j) for j in range(self.n_directions)]
        dirs, lps, lms = self._run_step(t, lr, self.weight_decay, seeds, closure, micro_batches, None)
        self._record(t, lr, dirs)
        valid = [d for d in dirs if d.skip is None]
        g = sum(d.g for d in valid) / len(valid) if valid else 0.0
        self.zero_grad_steps += int(bool(valid) and all(d.g == 0.0 for d in valid))
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        return StepResult(mean(lps), mean(lms), g, seeds[0], not valid)

    def _record(self, t: int, lr: float, dirs: list[_Dir]) -> None:
        for d in dirs:
            rec = {"step": t, "seed": d.seed, "g": d.g, "lr": lr, "wd": self.weight_decay}
            if d.skip:
                rec["skip"] = d.skip
                self.skipped_directions += 1
            self.log.append(rec)
        self.step_count = t + 1

    # ------------------------------------------------------------------------------------------- replay, state
    def replay_(self, log: Iterable[dict]) -> "MeZO":
        """Apply logged steps to the current weights (which must be the weights the log started from)."""
        by_step: dict[int, list[dict]] = {}
        for rec in log:
            by_step.setdefault(int(rec["step"]), []).append(rec)
        for t in sorted(by_step):
            recs = by_step[t]
            dirs = [_Dir(int(r["seed"]), float(r["g"]), r.get("skip")) for r in recs]
            self._run_step(t, float(recs[0]["lr"]), float(recs[0]["wd"]), [d.seed for d in dirs], None, 1, dirs)
            self._record(t, float(recs[0]["lr"]), dirs)
        return self

    def config(self) -> dict:
        return {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay, "seed": self.seed,
                "n_directions": self.n_directions, "schedule": self.schedule,
                "total_steps": self.total_steps if self.schedule == "linear" else None}   # only linear uses it

    def state_dict(self) -> dict:
        return {"config": self.config(), "step": self.step_count, "skipped_directions": self.skipped_directions,
                "zero_grad_steps": self.zero_grad_steps, "log": list(self.log)}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters and the log (the weights are the model's business: load or replay them)."""
        cfg = state["config"]
        for k in ("eps", "n_directions", "seed"):
            if cfg[k] != getattr(self, k):
                raise ValueError(f"state_dict was saved with {k}={cfg[k]!r}, this optimizer has {getattr(self, k)!r}")
        self.lr, self.weight_decay = cfg["lr"], cfg["weight_decay"]
        self.schedule, self.total_steps = cfg["schedule"], cfg["total_steps"]
        self.step_count, self.log = int(state["step"]), list(state["log"])
        self.skipped_directions, self.zero_grad_steps = state["skipped_directions"], state["zero_grad_steps"]


def replay(params: Iterable, log: Iterable[dict], config: dict, backend: str = "auto",
           exact_restore: bool | None = None) -> MeZO:
    """Rebuild trained weights in place from the initial ``params`` and a seed log (bit for bit on the same
    backend and mode). ``config`` is ``MeZO.config()`` of the run that wrote the log. Returns the optimizer, ready
    to continue training (resume)."""
    opt = MeZO(params, backend=backend, exact_restore=exact_restore, **config)
    return opt.replay_(log)

