"""What a MeZO run fixes at construction: :class:`Settings`, checked once by :func:`check_settings` (the seed, the
distribution, the modes and the scalars enter there and are read as they are from then on), and rendered by
:meth:`Settings.config` as ``MeZO.config()``, the constructor arguments that fix the run's bits.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import rng
from ..rng.lowrank import check_rank
from . import seedlog
from .param_groups import check_hyper

__all__ = ["Settings", "check_settings"]
_PERTURB = ("virtual", "inplace")
_ROUNDING = ("nearest", "stochastic")
_SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class Settings:
    eps: float
    seed: int                                 # checked: an int in [0, 2**64)
    n_directions: int
    schedule: str
    total_steps: int | None
    perturb: str                              # "inplace" or "virtual"
    distribution: rng.Distribution            # parsed once
    rounding: str                             # of the update without masters: "nearest" or "stochastic"
    exact_restore: bool | None = None         # as given (None: the mode's default)
    bases: tuple[int, ...] | None = None      # explicit bases as given, else None (the running sum)
    no_decay_names: tuple[str, ...] | None = None   # an explicit no-decay name list
    groups: tuple[dict, ...] | None = None    # the param groups' sizes, lr, weight_decay (``param_groups.Layout``)
    lowrank_r: int | None = None              # distribution="lowrank": the rank (dense tensors draw ``distribution``)
    lowrank_lazy: int = 1                     # LoZO's lazy V: V kept for this many steps

    @property
    def label(self) -> str:
        """The public name of the direction family: ``gaussian``, ``rademacher`` or ``lowrank``."""
        return "lowrank" if self.lowrank_r is not None else self.distribution.label

    def config(self, lr: float, weight_decay: float) -> dict:
        """``MeZO.config()``: the constructor arguments that fix the run's bits (``MeZO(params, **config())``
        rebuilds it); ``lr``/``weight_decay``: the optimizer's defaults."""
        cfg = {"lr": lr, "eps": self.eps, "weight_decay": weight_decay, "seed": self.seed,
               "n_directions": self.n_directions, "schedule": self.schedule,
               "total_steps": self.total_steps if self.schedule == "linear" else None}   # only linear uses it
        # keys past the first seven only when they differ from the defaults, so earlier logs still match
        if self.exact_restore is not None:
            cfg["exact_restore"] = self.exact_restore
        if self.bases is not None:
            cfg["bases"] = list(self.bases)
        if self.no_decay_names is not None:
            cfg["no_decay"] = list(self.no_decay_names)
        if self.groups is not None:
            cfg["groups"] = [dict(g) for g in self.groups]
        default = seedlog.modes({"perturb": self.perturb})      # the rounding's default depends on the mode
        if self.perturb != "inplace":
            cfg["perturb"] = self.perturb
        if self.label != default["distribution"]:
            cfg["distribution"] = self.label
        if self.lowrank_r is not None:
            cfg["lowrank_r"] = self.lowrank_r
        if self.lowrank_lazy != 1:
            cfg["lowrank_lazy"] = self.lowrank_lazy
        if self.rounding != default["rounding"]:
            cfg["rounding"] = self.rounding
        return cfg


def check_settings(eps: object, seed: object, n_directions: object, schedule: object, total_steps: object,
                   perturb: object, has_model: bool, distribution: object, rounding: object,
                   exact_restore: bool | None, lowrank_r: object = None, lowrank_lazy: object = None) -> Settings:
    """The constructor's scalars and modes checked (a ValueError or TypeError naming the bad one) and parsed, the
    defaults filled in: ``perturb`` None is in place; ``rounding`` None is stochastic for virtual, else nearest.
    ``has_model``: whether ``MeZO`` got ``model=`` (virtual perturbation and low-rank directions need it).
    ``distribution="lowrank"``: rank ``lowrank_r`` (default 1) directions applied in the forward (``perturb``
    defaults to virtual), V kept ``lowrank_lazy`` steps (default 1: redrawn every step). The layout's parts
    (bases, no-decay names, groups) are added by ``MeZO`` with ``dataclasses.replace``."""
    eps = check_hyper(eps, "eps")
    if eps == 0:
        raise ValueError("eps must be > 0")
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be an int >= 1, got {n_directions!r}")
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
    if schedule == "linear" and not (isinstance(total_steps, int) and total_steps > 0):
        raise ValueError("the linear schedule needs total_steps > 0")
    seed = rng.check_seed(seed)
    lowrank = distribution == "lowrank"
    r, lazy = _check_lowrank(lowrank, lowrank_r, lowrank_lazy, has_model, n_directions)
    if perturb is None and lowrank:
        perturb = "virtual"                  # the rank-r term in the forward: the point of the mode
    if perturb is None:
        perturb = "inplace"
    elif perturb not in _PERTURB:
        raise ValueError(f"perturb must be one of {_PERTURB} or None, got {perturb!r}")
    if perturb == "virtual" and not has_model:
        raise ValueError("perturb='virtual' needs model=: the nn.Module that owns the parameters (its modules "
                         "see the perturbed tensors during their forward); or use perturb='inplace'")
    dist = rng.Distribution.GAUSSIAN if lowrank else rng.distribution_code(distribution)
    if rounding is not None and rounding not in _ROUNDING:
        raise ValueError(f"rounding must be one of {_ROUNDING} or None, got {rounding!r}")
    rounding = rounding or ("stochastic" if perturb == "virtual" else "nearest")
    return Settings(eps, seed, n_directions, schedule, total_steps, perturb, dist, rounding, exact_restore,
                    lowrank_r=r, lowrank_lazy=lazy)


def _check_lowrank(lowrank: bool, r: object, lazy: object, has_model: bool,
                   n_directions: int) -> tuple[int | None, int]:
    """``(lowrank_r, lowrank_lazy)`` checked: None and 1 for the dense distributions."""
    if not lowrank:
        for name, val in (("lowrank_r", r), ("lowrank_lazy", lazy)):
            if val is not None:
                raise ValueError(f"{name} is an option of distribution='lowrank' (got {name}={val!r} with another "
                                 "distribution)")
        return None, 1
    if not has_model:
        raise ValueError("distribution='lowrank' needs model=: the nn.Module that owns the parameters (the rank-r "
                         "term is added in its modules' forward)")
    r = check_rank(1 if r is None else r)
    lazy = 1 if lazy is None else lazy
    if isinstance(lazy, bool) or not isinstance(lazy, int) or lazy < 1:
        raise ValueError(f"lowrank_lazy must be an int >= 1 (steps V is kept), got {lazy!r}")
    if lazy > 1 and n_directions > 1:
        raise ValueError(f"lowrank_lazy={lazy} keeps one V per tensor for {lazy} steps, so the {n_directions} "
                         "directions of a step would reuse it and span only its r columns; use n_directions=1 "
                         "with lowrank_lazy, or lowrank_lazy=1")
    return r, lazy
