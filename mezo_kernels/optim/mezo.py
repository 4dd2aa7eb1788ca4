"""The MeZO optimizer: ``step(closure)`` = loss at theta + eps*z, loss at theta - eps*z, one update.

Two ways to show the closure the perturbed weights (``perturb=``): ``"inplace"`` writes theta + eps*z into the
weights, then theta - eps*z, and fuses the restore with the update; ``"virtual"`` (needs ``model=``) never writes
them during the passes: each module sees its trainable tensors materialised just in time (``virtual.py``), so
restore is free and exact in every dtype, and the update is the only write of a step (rounded stochastically in
fp16/bf16, as no fp32 master keeps the small steps).

A ``torch.optim.Optimizer``: param groups with their own ``lr`` and ``weight_decay``, so torch and HF LR schedulers
drive it unchanged (the kernels read each group's current ``lr`` at every step). Model-agnostic: it sees tensors
and a closure returning a float loss, never transformers or peft.

Every weight operation of a step is issued by ``_run_step``, which both ``step`` (losses from the closure) and
``replay_`` (losses from the log) call. Replay therefore repeats the same operations in the same order and lands on
the same bits, also in plain in-place mode where each perturbation pass rounds.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

from .. import rng
from .param_groups import NoDecay, check_hyper, layout, no_decay
from .state import ReplayState, _Dir, replay
from ..perturb import ParamSet
from ..virtual import VirtualPerturbation

__all__ = ["MeZO", "StepResult", "replay", "no_decay"]
_PERTURB = ("virtual", "inplace")
_ROUNDING = ("nearest", "stochastic")
_NO_FORWARDS = object()     # model= of an optimizer rebuilt by replay() without the model: it replays, not steps


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


class MeZO(ReplayState, torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO) over a set of tensors.

    Args:
        params: tensors or ``(name, tensor)`` pairs (fp32/fp16/bf16, contiguous, requiring grad), or torch-style
            param groups (dicts with ``"params"`` and optional ``"lr"``, ``"weight_decay"``).
        lr, eps: learning rate and perturbation scale. weight_decay: decoupled. With a flat ``params`` list and
            ``weight_decay > 0`` the tensors are split into a decay group and a no-decay group (weight_decay 0).
        no_decay: for that split: a collection of names, or ``f(name, tensor) -> bool``; default :func:`no_decay`.
        seed: base seed; step t, direction j uses ``rng.seed_for(seed, t, j, n_directions)``.
        n_directions: directions per step, their updates averaged.
        schedule: ``"constant"`` or ``"linear"`` (to 0 at ``total_steps``), a factor on every group's ``lr``;
            keep ``"constant"`` when a torch LR scheduler drives the groups.
        exact_restore: fp32 masters for fp16/bf16 tensors (passed to ``ParamSet``). Default: in place, yes (so
            restore is exact); virtual, no (restore needs none, the update rounds stochastically).
        bases: explicit global base index per tensor, in the order of ``params`` (groups concatenated); default:
            the running sum over that order. A tensor-parallel shard passes the bases of the unsharded parameters
            (``distributed.sharded_params``) so that its z is exactly the z of a single-process run.
        groups: how a flat ``params`` list splits into groups, as ``config()["groups"]`` records it (replay).
        perturb: ``"virtual"`` or ``"inplace"`` (module docstring; default in place). Virtual keeps fp16/bf16
            training at the inference peak without fp32 masters (full-parameter bf16 SmolLM2-135M: 1.02x against
            2.27x with masters) but took 1.06-1.33x the in-place step time on the 2-core CPU (bench/RESULTS.md,
            step-cpu-perturb): choose it for memory.
        model: the ``nn.Module`` owning the parameters, for ``perturb="virtual"`` (a ValueError without it).
        distribution: ``"gaussian"`` (default) or ``"rademacher"`` (+-1 signs): the directions z.
        rounding: of the update in fp16/bf16 without masters: ``"stochastic"`` (default for virtual; its bits come
            from the step seed's own SR stream) or ``"nearest"`` (default in place).
    """

    def __init__(self, params: Iterable, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 backend: str = "auto", n_directions: int = 1, schedule: str = "constant",
                 total_steps: int | None = None, exact_restore: bool | None = None,
                 bases: Sequence[int] | None = None, no_decay: NoDecay = None, groups: Sequence[dict] | None = None,
                 perturb: str | None = None, model: torch.nn.Module | None = None, distribution: str = "gaussian",
                 rounding: str | None = None):
        lr, weight_decay = check_hyper(lr, "lr"), check_hyper(weight_decay, "weight_decay")
        eps = check_hyper(eps, "eps")
        if eps == 0:
            raise ValueError("eps must be > 0")
        if not isinstance(n_directions, int) or n_directions < 1:
            raise ValueError(f"n_directions must be an int >= 1, got {n_directions!r}")
        if schedule not in ("constant", "linear"):
            raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
        if schedule == "linear" and not (isinstance(total_steps, int) and total_steps > 0):
            raise ValueError("the linear schedule needs total_steps > 0")
        self.eps, self.seed, self.n_directions = eps, rng.check_seed(seed), n_directions
        self.schedule, self.total_steps = schedule, total_steps
        self._exact, self._explicit_bases = exact_restore, bases is not None
        lay = layout(params, lr, weight_decay, no_decay, groups)
        names, tensors = lay.names, lay.tensors
        self.perturb = _perturb_mode(perturb, model, tensors)
        self.distribution = rng.distribution_code(distribution).label
        if rounding is not None and rounding not in _ROUNDING:
            raise ValueError(f"rounding must be one of {_ROUNDING} or None, got {rounding!r}")
        self.rounding = rounding or ("stochastic" if self.perturb == "virtual" else "nearest")
        set_exact = exact_restore if (exact_restore is not None or self.perturb == "inplace") else False
        self._groups_cfg, self._no_decay_names = lay.groups_cfg, lay.no_decay_names
        if bases is None:
            bases = rng.default_bases(t.numel() for t in tensors)   # global over the whole set: grouping-invariant
        else:
            bases = list(bases)                                      # values are checked by ParamSet
            if len(bases) != len(tensors):
                raise ValueError(f"bases has {len(bases)} entries for {len(tensors)} tensors")
        ptrs = [t.data_ptr() for t in tensors if t.numel()]
        if len(set(ptrs)) != len(ptrs):
            raise ValueError("the same storage appears twice in the parameter list: it would be perturbed twice")
        self._bases = bases
        self._sets: list[ParamSet | None] = []
        torch_groups = []
        for idx, g_lr, g_wd, extra in lay.groups:
            ps = None
            if idx:
                ps = ParamSet([(names[i], tensors[i]) for i in idx], bases=[bases[i] for i in idx],
                              backend=backend, exact_restore=set_exact, require_grad=True,
                              distribution=self.distribution)
            self._sets.append(ps)
            torch_groups.append({**extra, "params": [tensors[i] for i in idx], "lr": g_lr, "weight_decay": g_wd,
                                 "param_names": [names[i] for i in idx]})
        self._flat = [i for idx, *_r in lay.groups for i in idx]      # position in group order -> flat index
        self._building = True
        super().__init__(torch_groups, {"lr": lr, "weight_decay": weight_decay})
        self._building = False
        self.step_count = 0
        self.skipped_directions = 0
        self.zero_grad_steps = 0
        self.log: list[dict] = []
        self._virtual = None
        if self.perturb == "virtual" and model is not _NO_FORWARDS:
            self._virtual = VirtualPerturbation(model, self.param_sets)
        self._warned_unreached = False

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_building", False):
            raise ValueError("MeZO fixes its tensors' perturbation layout (each tensor's z offset) at construction; "
                             "build a new MeZO with every param group instead of add_param_group")
        self.param_groups.append(param_group)

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def param_sets(self) -> list[ParamSet]:
        return [ps for ps in self._sets if ps is not None]

    @property
    def virtual(self) -> VirtualPerturbation | None:
        """The hooks of ``perturb="virtual"`` (with their memory statistics), else None."""
        return self._virtual

    @property
    def lr(self) -> float:
        """The first group's current ``lr``."""
        return self.param_groups[0]["lr"]

    @property
    def weight_decay(self) -> float:
        return self.defaults["weight_decay"]

    @property
    def version(self) -> int:
        """Changes whenever any weight is written (for caches keyed on the weights)."""
        return sum(ps.version for ps in self.param_sets)

    def _factor(self, step: int) -> float | None:
        return max(0.0, 1.0 - step / self.total_steps) if self.schedule == "linear" else None

    def lr_at(self, step: int, group: int = 0) -> float:
        """The lr the kernels use at ``step`` for ``group``: its current ``lr`` (times the linear factor)."""
        f, lr = self._factor(step), self.param_groups[group]["lr"]
        return lr if f is None else lr * f

    def _hyper(self, step: int) -> list[tuple[float, float]]:
        return [(self.lr_at(step, k), float(g["weight_decay"])) for k, g in enumerate(self.param_groups)]

    def seed_for(self, step: int, j: int = 0) -> int:
        return rng.seed_for(self.seed, step, j, self.n_directions)

    def _perturb(self, seed: int, offset: float) -> None:
        for ps in self.param_sets:
            ps.perturb_(seed, offset)

    def _restore(self) -> None:
        for ps in self.param_sets:
            ps.restore_()

    def _pass(self, seed: int, offset: float, closure: Callable | None, micro_batches: int) -> float:
        """The loss at theta + offset*z(seed) (0.0 when replaying: ``closure`` None). In place, the weights stay
        perturbed afterwards (the next pass or the fused update starts from there); virtual, nothing was written."""
        if self.perturb == "inplace":
            self._perturb(seed, offset)
            return self._loss(closure, micro_batches) if closure is not None else 0.0
        if closure is None:
            return 0.0
        with self._virtual.perturbed(seed, offset):
            loss = self._loss(closure, micro_batches)
        if self._virtual.unreached and not self._warned_unreached and math.isfinite(loss):
            self._warned_unreached = True
            warnings.warn(f"virtual perturbation: no module forward read {', '.join(self._virtual.unreached[:3])}"
                          f"{' ...' if len(self._virtual.unreached) > 3 else ''} during the pass; a tensor read "
                          "outside its own module's forward sees theta unperturbed (use perturb='inplace' there)",
                          RuntimeWarning, stacklevel=4)
        return loss

    @staticmethod
    def _loss(closure: Callable, micro_batches: int) -> float:
        total = 0.0
        for i in range(micro_batches):
            v = closure(i) if micro_batches > 1 else closure()
            total += float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
        return total / micro_batches

    # ------------------------------------------------------------------------------------------- the step
    def _run_step(self, hyper: list[tuple[float, float]], seeds: Sequence[int], closure: Callable | None,
                  micro_batches: int, recorded: Sequence[_Dir] | None) -> tuple[list[_Dir], list, list]:
        dirs, lps, lms = [], [], []
        n = len(seeds)
        try:
            for j, s in enumerate(seeds):
                d = _Dir(s)
                lp = self._pass(s, +self.eps, closure if recorded is None else None, micro_batches)
                if recorded is not None:
                    d.skip = recorded[j].skip
                elif not math.isfinite(lp):
                    d.skip = "plus"
                if d.skip == "plus":
                    self._restore(); dirs.append(d); continue
                lm = self._pass(s, -self.eps, closure if recorded is None else None, micro_batches)
                if recorded is None and not math.isfinite(lm):
                    d.skip = "minus"
                if d.skip == "minus":
                    self._restore(); dirs.append(d); continue
                d.g = recorded[j].g if recorded is not None else projected_grad(lp, lm, self.eps)[0]
                lps.append(lp); lms.append(lm)
                if j < n - 1:
                    self._restore()
                dirs.append(d)
            self._commit(hyper, dirs)
        finally:
            self._restore()          # never leave the weights perturbed, whatever happened above
        return dirs, lps, lms

    def _commit(self, hyper: list[tuple[float, float]], dirs: list[_Dir]) -> None:
        """Apply the averaged update; in place with nearest rounding, the still-perturbed last direction first,
        fused with its restore; otherwise restore (a no-op when virtual), then one update pass per direction."""
        valid = [d for d in dirs if d.skip is None]
        if not valid:
            return
        if self.perturb == "virtual" or self.rounding == "stochastic":
            self._restore()
            for i, d in enumerate(valid):
                for ps, (lr, wd) in zip(self._sets, hyper):
                    # theta*1 + 0*z is theta in every rounding: skipping the pass keeps the weights' versions
                    # (and the caches keyed on them) for lr = 0 or g = 0
                    if ps is not None and (lr * d.g != 0 or (lr * wd != 0 and i == 0)):
                        ps.update_(d.seed, lr, d.g / len(valid), wd if i == 0 else 0.0, rounding=self.rounding)
            return
        order = ([valid[-1]] + valid[:-1]) if dirs[-1].skip is None else valid
        for i, d in enumerate(order):
            for ps, (lr, wd) in zip(self._sets, hyper):
                if ps is not None:   # decay lr*wd once per step; the directions' steps are averaged
                    ps.restore_update_(d.seed, lr, d.g / len(valid), wd if i == 0 else 0.0)

    def step(self, closure: Callable, micro_batches: int = 1) -> StepResult:
        """One MeZO step. ``closure()`` (or ``closure(i)`` for micro-batch i when ``micro_batches > 1``) returns the
        loss at the current weights as a float or a tensor; every micro-batch sees the same z."""
        if not callable(closure):
            raise TypeError("step() needs a closure that returns the loss (MeZO estimates the gradient from losses)")
        if self.perturb == "virtual" and self._virtual is None:
            raise ValueError("this optimizer was rebuilt for replay without model=: pass model= (the module that "
                             "owns the parameters) to replay() to continue training with virtual perturbation")
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        t, hyper = self.step_count, self._hyper(self.step_count)
        seeds = [self.seed_for(t, j) for j in range(self.n_directions)]
        dirs, lps, lms = self._run_step(hyper, seeds, closure, micro_batches, None)
        return self._result(t, hyper, dirs, lps, lms)

    def step_batched(self, pm_fn: Callable[[Sequence[int], float], Sequence[tuple[float, float]]]) -> StepResult:
        """One step whose 2n losses come from ``pm_fn(seeds, eps) -> [(L+_j, L-_j)]``, e.g.
        ``batched_pm.make_pm_fn`` (every pass in one batched forward). Virtual perturbation only: the weights are
        written once, by the update, exactly as ``step`` writes them in that mode, so ``replay_`` repeats it bit for
        bit (in place, replay perturbs the weights and fuses the restore with the update)."""
        if self.perturb != "virtual":
            raise ValueError("step_batched needs perturb='virtual' (pass model= to MeZO): in place, the seed log "
                             "replays perturbation passes that a batched step never makes")
        if not callable(pm_fn):
            raise TypeError("step_batched() needs pm_fn(seeds, eps) -> [(loss_plus, loss_minus)] per direction")
        t, hyper = self.step_count, self._hyper(self.step_count)
        seeds = [self.seed_for(t, j) for j in range(self.n_directions)]
        pairs = list(pm_fn(seeds, self.eps))
        if len(pairs) != len(seeds):
            raise ValueError(f"pm_fn returned {len(pairs)} loss pairs for {len(seeds)} directions")
        dirs, lps, lms = [], [], []
        for s, (lp, lm) in zip(seeds, pairs):
            d = _Dir(s)
            d.g, d.skip = projected_grad(float(lp), float(lm), self.eps)
            if d.skip is None:
                lps.append(float(lp)); lms.append(float(lm))
            dirs.append(d)
        self._commit(hyper, dirs)
        return self._result(t, hyper, dirs, lps, lms)

    def _result(self, t: int, hyper: list[tuple[float, float]], dirs: list[_Dir], lps: list, lms: list) -> StepResult:
        self._record(t, hyper, dirs)
        valid = [d for d in dirs if d.skip is None]
        g = sum(d.g for d in valid) / len(valid) if valid else 0.0
        self.zero_grad_steps += int(bool(valid) and all(d.g == 0.0 for d in valid))
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        return StepResult(mean(lps), mean(lms), g, dirs[0].seed, not valid)

    def _record(self, t: int, hyper: list[tuple[float, float]], dirs: list[_Dir]) -> None:
        wd = self.weight_decay
        # one (lr, wd) stands for every group when all lrs agree and each group decays by wd or not at all
        uniform = all(lr == hyper[0][0] and w in (0.0, wd) for lr, w in hyper)
        head = {"lr": hyper[0][0], "wd": wd} if uniform else \
            {"lr": hyper[0][0], "wd": hyper[0][1], "groups": [[lr, w] for lr, w in hyper]}
        for d in dirs:
            rec = {"step": t, "seed": d.seed, "g": d.g, **head}
            if d.skip:
                rec["skip"] = d.skip
                self.skipped_directions += 1
            self.log.append(rec)
        self.step_count = t + 1


def _perturb_mode(perturb: str | None, model, tensors: Sequence[torch.Tensor]) -> str:
    """The perturbation mode: ``perturb`` checked, or the default (see ``MeZO``)."""
    if perturb is None:
        return "inplace"
    if perturb not in _PERTURB:
        raise ValueError(f"perturb must be one of {_PERTURB} or None, got {perturb!r}")
    if perturb == "virtual" and model is None:
        raise ValueError("perturb='virtual' needs model=: the nn.Module that owns the parameters (its modules "
                         "see the perturbed tensors during their forward); or use perturb='inplace'")
    return perturb
