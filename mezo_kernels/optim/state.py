"""MeZO's replay log and checkpoint side: ``config``, ``replay_``, ``state_dict``, ``load_state_dict``, and
:func:`replay`, which rebuilds trained weights from a seed log.

A mixin of :class:`~mezo_kernels.optim.MeZO` (which provides the state used here: the param sets, the flat order,
the counters and ``_run_step``). Replay repeats the logged steps' weight operations through ``_run_step`` with the
logged g instead of losses, so it lands on the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

from . import seedlog

if TYPE_CHECKING:
    from .mezo import MeZO

__all__ = ["ReplayState", "replay"]


@dataclass
class _Dir:
    seed: int
    g: float = 0.0
    skip: str | None = None      # None, "plus" or "minus": where a non-finite loss stopped the direction


class ReplayState:
    """``config``/``replay_``/``state_dict``/``load_state_dict`` of ``MeZO``."""

    def _hyper_of(self, rec: dict) -> list[tuple[float, float]]:
        if "groups" in rec:
            if len(rec["groups"]) != len(self.param_groups):
                raise ValueError(f"step {rec['step']}: the log has {len(rec['groups'])} param groups, this optimizer "
                                 f"{len(self.param_groups)}")
            return [(float(lr), float(w)) for lr, w in rec["groups"]]
        lr, wd = float(rec["lr"]), float(rec["wd"])
        return [(lr, wd if g["weight_decay"] != 0 else 0.0) for g in self.param_groups]

    def replay_(self, log) -> "MeZO":
        """Apply logged steps to the current weights (which must be the weights the log started from).

        ``log``: records, or any form :func:`seedlog.load` reads; when it carries its config, a log made under
        other modes (distribution, perturbation, rounding) is refused with a ValueError."""
        logged, records = seedlog.load(log)
        if logged is not None:
            seedlog.check_modes(logged, self.config())
        by_step: dict[int, list[dict]] = {}
        for rec in records:
            by_step.setdefault(int(rec["step"]), []).append(rec)
        for t in sorted(by_step):
            recs = by_step[t]
            dirs = [_Dir(int(r["seed"]), float(r["g"]), r.get("skip")) for r in recs]
            hyper = self._hyper_of(recs[0])
            self._run_step(hyper, [d.seed for d in dirs], None, 1, dirs)
            self._record(t, hyper, dirs)
        return self

    def config(self) -> dict:
        """The constructor arguments that fix the run's bits (``MeZO(params, **config())`` rebuilds it)."""
        cfg = {"lr": self.defaults["lr"], "eps": self.eps, "weight_decay": self.weight_decay, "seed": self.seed,
               "n_directions": self.n_directions, "schedule": self.schedule,
               "total_steps": self.total_steps if self.schedule == "linear" else None}   # only linear uses it
        # keys past today's seven only when they differ from the defaults, so earlier logs still match
        if self._exact is not None:
            cfg["exact_restore"] = self._exact
        if self._explicit_bases:
            cfg["bases"] = list(self._bases)
        if self._no_decay_names is not None:
            cfg["no_decay"] = list(self._no_decay_names)
        if self._groups_cfg is not None:
            cfg["groups"] = [dict(g) for g in self._groups_cfg]
        default = seedlog.modes({"perturb": self.perturb})      # the rounding's default depends on the mode
        if self.perturb != "inplace":
            cfg["perturb"] = self.perturb
        for k in ("distribution", "rounding"):
            if getattr(self, k) != default[k]:
                cfg[k] = getattr(self, k)
        return cfg

    def state_dict(self) -> dict:
        """torch's ``{"state", "param_groups"}`` plus ``config``, ``step``, counters, the replay ``log`` and the fp32
        ``masters`` (one per tensor in ``params`` order, None where there is none; live tensors, as torch's)."""
        sd = super().state_dict()
        masters: list[torch.Tensor | None] = [None] * len(self._flat)
        in_order = [m for ps in self._sets if ps is not None for m in ps.masters()]   # group order
        for pos, m in enumerate(in_order):
            masters[self._flat[pos]] = m
        sd.update(config=self.config(), step=self.step_count, skipped_directions=self.skipped_directions,
                  zero_grad_steps=self.zero_grad_steps, log=list(self.log), masters=masters)
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
        if masters is not None and len(masters) != len(self._flat):
            raise ValueError(f"state_dict holds {len(masters)} tensors' masters, this optimizer has {len(self._flat)}")
        if "param_groups" in state:
            super().load_state_dict({"state": {}, "param_groups": state["param_groups"]})
        else:                                   # written before MeZO had param groups
            for g in self.param_groups:
                g["lr"], g["weight_decay"] = cfg["lr"], cfg["weight_decay"] if g["weight_decay"] != 0 else 0.0
        self.defaults.update(lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.schedule, self.total_steps = cfg["schedule"], cfg["total_steps"]
        self.step_count, self.log = int(state["step"]), list(state["log"])
        self.skipped_directions, self.zero_grad_steps = state["skipped_directions"], state["zero_grad_steps"]
        if masters is not None:
            start = 0
            for ps in self._sets:
                n = len(ps.tensors) if ps is not None else 0
                saved = [masters[i] for i in self._flat[start:start + n]]
                start += n
                if ps is None or all(m is None for m in saved):
                    continue
                ps.resync_()                    # the weights may have been reloaded (new storage or values)
                for m, src in zip(ps.masters(), saved):
                    if m is not None and src is not None and src.data_ptr() != m.data_ptr():
                        m.copy_(src)


def replay(params: Iterable, log, config: dict | None = None, backend: str = "auto",
           exact_restore: bool | None = None, model: torch.nn.Module | None = None) -> MeZO:
    """Rebuild trained weights in place from the initial ``params`` and a seed log, bit for bit on the same
    backend and mode.

    ``log``: a ``seeds.jsonl`` path, ``(header, records)``, a ``MeZO.state_dict()``, or records with ``config``.
    ``config``: ``MeZO.config()`` of the run; default: the one the log carries (a ValueError when both are there
    and their modes differ: another distribution would replay other directions). ``model``: the module owning
    ``params``, needed to continue training a virtual-perturbation run (replay itself runs no forward). Returns
    the optimizer, ready to continue training (resume)."""
    from .mezo import _NO_FORWARDS, MeZO  # MeZO mixes ReplayState in: imported when called, not at load
    logged, records = seedlog.load(log)
    if config is not None and logged is not None:
        seedlog.check_modes(logged, config)
    cfg = dict(config if config is not None else logged or {})
    if not cfg:
        raise ValueError("this log carries no config: pass config=MeZO.config() of the run that wrote it")
    if exact_restore is not None:
        cfg["exact_restore"] = exact_restore
    cfg.setdefault("perturb", "inplace")        # a config without the key was written in place
    if model is None and cfg.get("perturb") == "virtual":
        model = _NO_FORWARDS
    return MeZO(params, backend=backend, model=model, **cfg).replay_(records)
