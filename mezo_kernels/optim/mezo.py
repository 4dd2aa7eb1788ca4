"""The MeZO optimizer: ``step(closure)`` = loss at theta + eps*z, loss at theta - eps*z, one update
(``optim.replay`` rebuilds trained weights from a seed log).

A ``torch.optim.Optimizer``: param groups with their own ``lr`` and ``weight_decay``, so torch and HF LR schedulers
drive it unchanged (the kernels read each group's current ``lr`` at every step). Model-agnostic: it sees tensors
and a closure returning a float loss, never transformers or peft.

``MeZO`` composes its parts, each with a small interface: ``Settings`` (``settings.py``: what the constructor fixed,
checked once), a ``Stepper`` (``steps.py``: every weight operation of a step, issued in the same order by ``step``
and by ``replay_``, so replay lands on the same bits) and a ``StepLog`` (``state.py``: the counters and the seed
log, which carries the run's config: ``replay(params, opt.log)`` needs nothing else).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import torch

from .. import rng
from . import distributed, seedlog
from .build import build
from .param_groups import NoDecay, check_hyper, layout, no_decay
from .settings import Settings, check_settings
from .state import StepLog, hyper_of, load_masters, logged_steps, masters_in_order
from .steps import Direction, StepResult, Stepper, projected_grad
from ..perturb import ParamSet
from ..virtual import VirtualPerturbation

__all__ = ["MeZO", "StepResult", "no_decay", "projected_grad", "NO_FORWARDS"]
NO_FORWARDS = object()      # model= of an optimizer rebuilt by replay() without the model: it replays, not steps


class MeZO(torch.optim.Optimizer):
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
            the running sum over that order (of the full sizes for DTensors). A hand-made shard passes the bases of
            the unsharded parameters (``optim.shard.sharded_params``) so that its z is exactly the z of a
            single-process run; DTensor parameters need none (``optim.dtensor``: each rank perturbs its local
            shard with the global indices).
        groups: how a flat ``params`` list splits into groups, as ``config()["groups"]`` records it (replay).
        perturb: ``"virtual"`` or ``"inplace"`` (``optim.steps``; default in place). Virtual keeps fp16/bf16
            training at the inference peak without fp32 masters (full-parameter bf16 SmolLM2-135M: 1.02x against
            2.27x with masters) but took 1.06-1.33x the in-place step time on the 2-core CPU (bench/RESULTS.md,
            step-cpu-perturb): choose it for memory.
        model: the ``nn.Module`` owning the parameters: for ``perturb="virtual"`` and for DTensor parameters (a
            ValueError without it). MeZO reshards its FSDP2 modules before it reads the parameters and before every
            weight write, so the next forward gathers what was written (``optim.distributed``).
        distribution: ``"gaussian"`` (default), ``"rademacher"`` (+-1 signs) or ``"lowrank"``: the directions z.
            ``"lowrank"`` (EGGROLL, LoZO): a 2-d weight (m, n) gets z = U Vᵀ/sqrt(r) with U [m, r], V [n, r] from
            the spec's stream (``docs/rng_spec.md``), 1-d and small tensors the dense Gaussian; it needs ``model=``
            and defaults to ``perturb="virtual"``, where ``nn.Linear``/``nn.Embedding``/HF ``Conv1D`` add the
            rank-r term to their output (``virtual.lowrank``) and no weight is written or copied during the passes.
        lowrank_r: the rank r of ``"lowrank"`` (default 1). lowrank_lazy: keep V for this many steps while U is
            redrawn every step (LoZO's lazy V; default 1), needs ``n_directions=1``.
        rounding: of the update in fp16/bf16 without masters: ``"stochastic"`` (default for virtual; its bits come
            from the step seed's own SR stream) or ``"nearest"`` (default in place).
        loss_group: under ``torch.distributed``, the ranks whose closure losses are averaged (one all-reduce of
            the (L+, L-) pair per direction): None (default) for the data-parallel ranks of the parameters (plain
            tensors: the world; FSDP2: its mesh; a pure tensor-parallel mesh: none), False for none (the caller
            reduces), or a ProcessGroup. Every rank first checks that all have the same seed, config and shapes.
    """

    def __init__(self, params: Iterable, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 backend: str = "auto", n_directions: int = 1, schedule: str = "constant",
                 total_steps: int | None = None, exact_restore: bool | None = None,
                 bases: Sequence[int] | None = None, no_decay: NoDecay = None, groups: Sequence[dict] | None = None,
                 perturb: str | None = None, model: torch.nn.Module | None = None, distribution: str = "gaussian",
                 rounding: str | None = None, loss_group: object = None, lowrank_r: int | None = None,
                 lowrank_lazy: int | None = None):
        lr, weight_decay = check_hyper(lr, "lr"), check_hyper(weight_decay, "weight_decay")
        st = check_settings(eps, seed, n_directions, schedule, total_steps, perturb, model is not None,
                            distribution, rounding, exact_restore, lowrank_r, lowrank_lazy)
        fsdp = distributed.fsdp_modules(model, st.perturb)     # resharded first: parameters read as shards
        lay = layout(params, lr, weight_decay, no_decay, groups)
        names, tensors = lay.names, lay.tensors
        explicit = None if bases is None else tuple(bases)           # values are checked by ParamSet
        if explicit is not None and len(explicit) != len(tensors):
            raise ValueError(f"bases has {len(explicit)} entries for {len(tensors)} tensors")
        # default: global over the whole set (full sizes), so grouping- and sharding-invariant
        bases = list(explicit) if explicit is not None else rng.default_bases(t.numel() for t in tensors)
        set_exact = exact_restore if (exact_restore is not None or st.perturb == "inplace") else False
        built = build(names, tensors, bases, lay.groups, backend=backend, exact=set_exact,
                      distribution=st.distribution, model=model, fsdp=fsdp, loss_group=loss_group,
                      lowrank_r=st.lowrank_r)
        self._settings: Settings = dataclasses.replace(
            st, bases=explicit, no_decay_names=None if lay.no_decay_names is None else tuple(lay.no_decay_names),
            groups=None if lay.groups_cfg is None else tuple(dict(g) for g in lay.groups_cfg))
        self._sets, self._flat, self._sharded = built.sets, built.flat, built.sharded
        self._n_tensors = len(tensors)
        torch_groups = [{**extra, "params": [tensors[i] for i in idx], "lr": g_lr, "weight_decay": g_wd,
                         "param_names": [names[i] for i in idx]} for idx, g_lr, g_wd, extra in lay.groups]
        self._building = True
        super().__init__(torch_groups, {"lr": lr, "weight_decay": weight_decay})
        self._building = False
        virtual = None
        if st.perturb == "virtual" and model is not NO_FORWARDS:
            virtual = VirtualPerturbation(model, self.param_sets, wrapped=built.wrapped)
        self._stepper = Stepper(self._sets, st.eps, st.perturb, st.rounding, virtual, built.reduce, built.prepare)
        self._steps = StepLog(self.config())
        shapes = [] if explicit is not None and built.sharded is None else \
            [(tuple(t.shape), str(t.dtype)) for t in tensors]          # global shapes (hand-made shards differ)
        distributed.check_same(built.check_group, self.seed, self.config(), shapes)

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_building", False):
            raise ValueError("MeZO fixes its tensors' perturbation layout (each tensor's z offset) at construction; "
                             "build a new MeZO with every param group instead of add_param_group")
        self.param_groups.append(param_group)

    # ------------------------------------------------------------------------------------------- what it holds
    eps = property(lambda self: self._settings.eps, doc="The perturbation scale.")
    seed = property(lambda self: self._settings.seed, doc="The base seed (checked: an int in [0, 2**64)).")
    n_directions = property(lambda self: self._settings.n_directions, doc="Directions per step.")
    schedule = property(lambda self: self._settings.schedule, doc="``constant`` or ``linear``.")
    total_steps = property(lambda self: self._settings.total_steps, doc="The linear schedule's length.")
    perturb = property(lambda self: self._settings.perturb, doc="``inplace`` or ``virtual``.")
    distribution = property(lambda self: self._settings.label, doc="``gaussian``, ``rademacher`` or ``lowrank``.")
    lowrank_r = property(lambda self: self._settings.lowrank_r, doc="The rank of low-rank directions, or None.")
    lowrank_lazy = property(lambda self: self._settings.lowrank_lazy, doc="Steps a low-rank V is kept.")
    rounding = property(lambda self: self._settings.rounding, doc="Of the update: ``nearest`` or ``stochastic``.")
    step_count = property(lambda self: self._steps.step_count, doc="Steps taken (or replayed).")
    skipped_directions = property(lambda self: self._steps.skipped_directions,
                                  doc="Directions left out for a non-finite loss.")
    zero_grad_steps = property(lambda self: self._steps.zero_grad_steps, doc="Trained steps whose g was all 0.")

    @property
    def log(self) -> seedlog.SeedLog:
        """The replay log: one record per direction, as ``seeds.jsonl`` holds them, carrying ``config()`` (so
        ``replay(params, opt.log)`` rebuilds the weights)."""
        return self._steps.records

    @property
    def param_sets(self) -> list[ParamSet]:
        return [ps for ps in self._sets if ps is not None]

    @property
    def virtual(self) -> VirtualPerturbation | None:
        """The hooks of ``perturb="virtual"`` (with their memory statistics), else None."""
        return self._stepper.virtual

    @property
    def loss_group(self):
        """The process group whose closure losses each step averages, or None (no reduction)."""
        return getattr(self._stepper.reduce, "group", None)

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

    def lr_at(self, step: int, group: int = 0) -> float:
        """The lr the kernels use at ``step`` for ``group``: its current ``lr`` (times the linear factor)."""
        lr = self.param_groups[group]["lr"]
        return lr * max(0.0, 1.0 - step / self.total_steps) if self.schedule == "linear" else lr

    def _hyper(self, step: int) -> list[tuple[float, float]]:
        return [(self.lr_at(step, k), float(g["weight_decay"])) for k, g in enumerate(self.param_groups)]

    def seed_for(self, step: int, j: int = 0) -> int:
        return rng.seed_for(self.seed, step, j, self.n_directions)

    def _keys(self, step: int, seeds: Sequence[int]) -> list | None:
        """What the weight operations of ``step`` draw from, per direction: None (its seed) except with lazy
        low-rank V, where it is ``(seed_u, seed_v)`` and V's seed is that of the step opening the window."""
        lazy = self._settings.lowrank_lazy
        if lazy == 1:
            return None
        t0 = step - step % lazy
        return [(s, self.seed_for(t0, j)) for j, s in enumerate(seeds)]

    def config(self) -> dict:
        """The constructor arguments that fix the run's bits (``MeZO(params, **config())`` rebuilds it)."""
        return self._settings.config(self.defaults["lr"], self.weight_decay)

    # ------------------------------------------------------------------------------------------- the step
    def step(self, closure: Callable, micro_batches: int = 1) -> StepResult:
        """One MeZO step. ``closure()`` (or ``closure(i)`` for micro-batch i when ``micro_batches > 1``) returns the
        loss at the current weights as a float or a tensor; every micro-batch sees the same z."""
        if not callable(closure):
            raise TypeError("step() needs a closure that returns the loss (MeZO estimates the gradient from losses)")
        if self.perturb == "virtual" and self._stepper.virtual is None:
            raise ValueError("this optimizer was rebuilt for replay without model=: pass model= (the module that "
                             "owns the parameters) to replay() to continue training with virtual perturbation")
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        t, hyper = self.step_count, self._hyper(self.step_count)
        seeds = [self.seed_for(t, j) for j in range(self.n_directions)]
        dirs, lps, lms = self._stepper.run(hyper, seeds, closure, micro_batches, None, self._keys(t, seeds))
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
        pairs = list(pm_fn(self._keys(t, seeds) or seeds, self.eps))
        if len(pairs) != len(seeds):
            raise ValueError(f"pm_fn returned {len(pairs)} loss pairs for {len(seeds)} directions")
        if self._stepper.reduce is not None:         # every pair averaged over the loss group in one all-reduce
            flat = self._stepper.reduce([float(v) for pair in pairs for v in pair])
            pairs = list(zip(flat[0::2], flat[1::2]))
        dirs, lps, lms = [], [], []
        for s, (lp, lm) in zip(seeds, pairs):
            d = Direction(s)
            d.g, d.skip = projected_grad(float(lp), float(lm), self.eps)
            if d.skip is None:
                lps.append(float(lp)); lms.append(float(lm))
            dirs.append(d)
        self._stepper.commit(hyper, dirs)
        return self._result(t, hyper, dirs, lps, lms)

    def _result(self, t: int, hyper: list[tuple[float, float]], dirs: list[Direction], lps: list,
                lms: list) -> StepResult:
        self._steps.record(t, hyper, dirs, self.weight_decay)
        self._steps.count_zero_grad(dirs)
        valid = [d for d in dirs if d.skip is None]
        g = sum(d.g for d in valid) / len(valid) if valid else 0.0
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        return StepResult(mean(lps), mean(lms), g, dirs[0].seed, not valid)

    # ------------------------------------------------------------------------------------------- replay and state
    def replay_(self, log) -> "MeZO":
        """Apply logged steps to the current weights (which must be the weights the log started from).

        ``log``: records, or any form :func:`seedlog.load` reads; when it carries its config, a log made under
        other modes (distribution, perturbation, rounding) is refused with a ValueError."""
        logged, records = seedlog.load(log)
        if logged is not None:
            seedlog.check_modes(logged, self.config())
        decays = [g["weight_decay"] for g in self.param_groups]
        for t, dirs, first in logged_steps(records):
            hyper = hyper_of(first, decays)
            seeds = [d.seed for d in dirs]
            self._stepper.run(hyper, seeds, None, 1, dirs, self._keys(t, seeds))
            self._steps.record(t, hyper, dirs, self.weight_decay)
        return self

    def state_dict(self) -> dict:
        """torch's ``{"state", "param_groups"}`` plus ``config``, ``step``, counters, the replay ``log`` and the fp32
        ``masters`` (one per tensor in ``params`` order, None where there is none; live tensors, as torch's)."""
        sd = super().state_dict()
        sd.update(config=self.config(), **self._steps.state(),
                  masters=masters_in_order(self._sets, self._flat, self._sharded))
        return sd

    def load_state_dict(self, state: dict) -> None:
        """Restore group hyperparameters, counters, the log and the fp32 masters. The visible weights are the
        model's business (a checkpoint loads them; ``replay_`` rebuilds them)."""
        if not isinstance(state, dict) or not {"config", "step", "log"} <= state.keys():
            raise ValueError("not a MeZO state_dict (expected the keys config, step and log)")
        cfg = state["config"]
        for k in ("eps", "n_directions", "seed"):
            if cfg[k] != getattr(self, k):
                raise ValueError(f"state_dict was saved with {k}={cfg[k]!r}, this optimizer has {getattr(self, k)!r}")
        seedlog.check_modes(cfg, self.config(), "state_dict")
        masters = state.get("masters")
        if masters is not None and len(masters) != self._n_tensors:
            raise ValueError(f"state_dict holds {len(masters)} tensors' masters, this optimizer has "
                             f"{self._n_tensors}")
        if "param_groups" in state:
            super().load_state_dict({"state": {}, "param_groups": state["param_groups"]})
        else:                                   # written before MeZO had param groups
            for g in self.param_groups:
                g["lr"], g["weight_decay"] = cfg["lr"], cfg["weight_decay"] if g["weight_decay"] != 0 else 0.0
        self.defaults.update(lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self._settings = dataclasses.replace(self._settings, schedule=cfg["schedule"], total_steps=cfg["total_steps"])
        self._steps.load(state, self.config())
        if masters is not None:
            load_masters(self._sets, self._flat, masters, self._sharded)
