"""How MeZO's parameters split into param groups: the no-decay rule, torch-style dict groups, and the layout that
``MeZO.config()`` records so that a flat list splits the same way on replay.

The perturbation layout (each tensor's base, hence its z) follows the *flat* order of the parameters: the given
order for a flat list, the groups concatenated for dicts. Grouping decides only the lr and weight decay.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Sequence

import torch

from ..perturb import split_named

# the name patterns of transformers' Trainer.get_decay_parameter_names, matched on the lowercased name
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
NoDecay = Collection[str] | Callable[[str, torch.Tensor], bool] | None


def no_decay(name: str, t: torch.Tensor) -> bool:
    """No weight decay on biases and normalization weights: HF's name patterns, plus every tensor of <= 1 dim
    (HF finds norm layers by module type; from a name alone, their 1-d weights stand in for it)."""
    return t.dim() <= 1 or _NO_DECAY_NAMES.search(name.lower()) is not None


def check_hyper(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {v!r}")
    return float(v)


@dataclass
class Layout:
    names: list[str]                        # flat order
    tensors: list[torch.Tensor]
    groups: list[tuple[list[int], float, float, dict]]   # (flat indices, lr, weight_decay, other group keys)
    groups_cfg: list[dict] | None = None    # for config(): the dict groups' sizes, lr, weight_decay
    no_decay_names: list[str] | None = field(default=None)   # for config(): an explicit no-decay name list


def layout(params: Iterable, lr: float, wd: float, rule: NoDecay, groups: Sequence[dict] | None) -> Layout:
    """Split ``params`` (flat tensors / (name, tensor) pairs, or dict groups) into groups. A flat list with
    ``wd > 0`` becomes a decay group and a no-decay group (``rule``: names or a predicate; default
    :func:`no_decay`); ``groups`` (``config()["groups"]``) splits a flat list into consecutive groups instead."""
    entries = list(params) if not isinstance(params, torch.Tensor) else [params]
    if entries and isinstance(entries[0], dict):
        if groups is not None or rule is not None:
            raise ValueError("groups= and no_decay= split a flat parameter list; with param groups (dicts), set "
                             "each group's weight_decay instead")
        flat, specs = [], []
        for gi, d in enumerate(entries):
            if not isinstance(d, dict) or "params" not in d:
                raise TypeError(f"param group {gi}: expected a dict with 'params', got {type(d).__name__}")
            ps = [d["params"]] if isinstance(d["params"], torch.Tensor) else list(d["params"])
            if d.get("param_names") is not None:
                ps = list(zip(d["param_names"], ps))
            extra = {k: v for k, v in d.items() if k not in ("params", "lr", "weight_decay", "param_names")}
            specs.append((list(range(len(flat), len(flat) + len(ps))), check_hyper(d.get("lr", lr), f"group {gi} lr"),
                          check_hyper(d.get("weight_decay", wd), f"group {gi} weight_decay"), extra))
            flat += ps
        names, tensors = split_named(flat)
        cfg = [{"size": len(idx), "lr": g_lr, "weight_decay": g_wd} for idx, g_lr, g_wd, _ in specs]
        return Layout(names, tensors, specs, groups_cfg=cfg)
    names, tensors = split_named(entries)
    if groups is not None:
        sizes = [int(g["size"]) for g in groups]
        if sum(sizes) != len(tensors):
            raise ValueError(f"groups describe {sum(sizes)} tensors, params has {len(tensors)}")
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        specs = [(list(range(s, s + n)), check_hyper(g["lr"], "groups lr"),
                  check_hyper(g["weight_decay"], "groups weight_decay"), {}) for s, n, g in zip(starts, sizes, groups)]
        return Layout(names, tensors, specs, groups_cfg=[dict(g) for g in groups])
    if wd == 0:
        return Layout(names, tensors, [(list(range(len(tensors))), lr, wd, {})])
    explicit = None
    if rule is None:
        exempt = [no_decay(n, t) for n, t in zip(names, tensors)]
    elif callable(rule):
        exempt = [bool(rule(n, t)) for n, t in zip(names, tensors)]
    else:
        rule = set(rule)
        exempt = [n in rule for n in names]
        explicit = [n for n, e in zip(names, exempt) if e]
    split = [([i for i, e in enumerate(exempt) if not e], wd), ([i for i, e in enumerate(exempt) if e], 0.0)]
    return Layout(names, tensors, [(idx, lr, w, {}) for idx, w in split if idx], no_decay_names=explicit)
