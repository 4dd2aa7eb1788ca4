"""What a MeZO run has done, and its checkpoint side: :class:`StepLog` (the step counter, the skip and zero-g
counters, the replay log), the logged steps read back for replay, and the fp32 masters in ``params`` order.

``MeZO`` owns a ``StepLog`` and hands it each step's hyperparameters and directions; nothing here sees the
optimizer: every function receives what it needs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import rng
from ..perturb import ParamSet
from .dtensor import ShardedLayout, join_masters, split_master
from .seedlog import SeedLog
from .steps import Direction

__all__ = ["StepLog", "logged_steps", "hyper_of", "masters_in_order", "load_masters"]


class StepLog:
    """``step_count``, ``skipped_directions``, ``zero_grad_steps``, and ``records``: a :class:`SeedLog` (one dict
    ``{"step", "seed", "g", "lr", "wd"[, "skip"][, "groups"]}`` per direction) carrying ``config``, the run's
    ``MeZO.config()``."""

    def __init__(self, config: dict):
        self.records = SeedLog(config=config)
        self.step_count = self.skipped_directions = self.zero_grad_steps = 0

    def record(self, t: int, hyper: Sequence[tuple[float, float]], dirs: Sequence[Direction],
               weight_decay: float) -> None:
        """Log step ``t`` (its ``(lr, wd)`` per group, its directions) and count it; ``weight_decay``: the
        optimizer's default, which one ``(lr, wd)`` pair stands for when it can."""
        # one (lr, wd) stands for every group when all lrs agree and each group decays by wd or not at all
        uniform = all(lr == hyper[0][0] and w in (0.0, weight_decay) for lr, w in hyper)
        head = {"lr": hyper[0][0], "wd": weight_decay} if uniform else \
            {"lr": hyper[0][0], "wd": hyper[0][1], "groups": [[lr, w] for lr, w in hyper]}
        for d in dirs:
            rec = {"step": t, "seed": d.seed, "g": d.g, **head}
            if d.skip:
                rec["skip"] = d.skip
                self.skipped_directions += 1
            self.records.append(rec)
        self.step_count = t + 1

    def count_zero_grad(self, dirs: Sequence[Direction]) -> None:
        """A trained step (not a replayed one) whose valid directions all had g = 0 counts as a zero-g step."""
        valid = [d for d in dirs if d.skip is None]
        self.zero_grad_steps += int(bool(valid) and all(d.g == 0.0 for d in valid))

    def state(self) -> dict:
        """The ``state_dict`` entries: ``step``, the counters and ``log`` (plain records)."""
        return {"step": self.step_count, "skipped_directions": self.skipped_directions,
                "zero_grad_steps": self.zero_grad_steps, "log": list(self.records)}

    def load(self, state: dict, config: dict) -> None:
        """Take the counters and the log of ``state`` (a ``state_dict``); ``config``: the run's config now."""
        self.step_count = int(state["step"])
        self.records = SeedLog(state["log"], config)
        self.skipped_directions, self.zero_grad_steps = state["skipped_directions"], state["zero_grad_steps"]


def logged_steps(records: Sequence[dict]) -> list[tuple[int, list[Direction], dict]]:
    """``(step, its directions, its first record)`` per logged step, in step order; a logged seed is checked here,
    where it enters (a ValueError or TypeError naming the step)."""
    by_step: dict[int, list[dict]] = {}
    for rec in records:
        by_step.setdefault(int(rec["step"]), []).append(rec)
    out = []
    for t in sorted(by_step):
        try:
            dirs = [Direction(rng.check_seed(r["seed"]), float(r["g"]), r.get("skip")) for r in by_step[t]]
        except (TypeError, ValueError) as e:
            raise type(e)(f"step {t} of the log: {e}") from None
        out.append((t, dirs, by_step[t][0]))
    return out


def hyper_of(rec: dict, decays: Sequence[float]) -> list[tuple[float, float]]:
    """``(lr, wd)`` per param group of a logged step; ``decays``: each group's ``weight_decay`` (a group without
    decay gets none from a single logged ``wd``)."""
    if "groups" in rec:
        if len(rec["groups"]) != len(decays):
            raise ValueError(f"step {rec['step']}: the log has {len(rec['groups'])} param groups, this optimizer "
                             f"{len(decays)}")
        return [(float(lr), float(w)) for lr, w in rec["groups"]]
    lr, wd = float(rec["lr"]), float(rec["wd"])
    return [(lr, wd if d != 0 else 0.0) for d in decays]


def masters_in_order(sets: Sequence[ParamSet | None], flat: Sequence[int],
                     sharded: ShardedLayout | None = None) -> list[torch.Tensor | None]:
    """The fp32 masters, one per tensor in ``params`` order (None where there is none; live tensors, as torch's
    state). ``flat``: position in group order -> flat index, one position per set entry. ``sharded``: the runs of
    DTensor parameters, whose runs' masters are joined into one master of the local tensor (a new tensor)."""
    in_order = [m for ps in sets if ps is not None for m in ps.masters()]   # group order
    if sharded is None:
        masters: list[torch.Tensor | None] = [None] * len(flat)
        for pos, m in enumerate(in_order):
            masters[flat[pos]] = m
        return masters
    per: list[list] = [[] for _ in sharded.runs]
    for pos, m in enumerate(in_order):
        per[flat[pos]].append(m)
    return [join_masters(ms, sharded.local_shapes[i]) if sharded.is_dtensor[i] else (ms[0] if ms else None)
            for i, ms in enumerate(per)]


def load_masters(sets: Sequence[ParamSet | None], flat: Sequence[int], masters: Sequence[torch.Tensor | None],
                 sharded: ShardedLayout | None = None) -> None:
    """Copy saved ``masters`` (``masters_in_order``'s form, its length checked by the caller) into the sets."""
    if sharded is None:
        by_pos = [masters[i] for i in flat]
    else:
        pieces = [[None] * len(runs) if m is None else split_master(m, runs) if sharded.is_dtensor[i] else [m]
                  for i, (m, runs) in enumerate(zip(masters, sharded.runs))]
        taken = [0] * len(pieces)
        by_pos = []
        for i in flat:
            by_pos.append(pieces[i][taken[i]])
            taken[i] += 1
    start = 0
    for ps in sets:
        n = len(ps.tensors) if ps is not None else 0
        saved = by_pos[start:start + n]
        start += n
        if ps is None or all(m is None for m in saved):
            continue
        ps.resync_()                    # the weights may have been reloaded (new storage or values)
        for m, src in zip(ps.masters(), saved):
            if m is not None and src is not None and src.data_ptr() != m.data_ptr():
                m.copy_(src)
